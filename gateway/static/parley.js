// parley.js — a dependency-free client for Parley's WebSocket protocol (PRODUCT.md section 6).
//
//   import { Parley, PeerCall, fetchIceServers } from "/static/parley.js";
//   const client = new Parley("ws://127.0.0.1:8080/ws", { token });
//   await client.connect();
//   client.on("chat.message", (msg) => console.log(msg.sender, msg.body));
//   await client.join(sessionId);
//   await client.sendChat(sessionId, "hello");
//
// What it does for you:
// - `hello` / `welcome`, then requests with a fresh `ref`, each answered by exactly one
//   `ok` (resolves) or `error` (rejects with a ParleyError carrying the server's `code`),
//   or rejected with code "timeout" / "disconnected";
// - events: `on(type, fn)` / `off(type, fn)` / `once(type, predicate, timeoutMs)`, or the
//   EventTarget API (`addEventListener(type, e => e.detail)`); "*" receives every frame;
// - automatic reconnect with exponential backoff and jitter; joined sessions are re-joined,
//   chat resumes from the last seen `seq` (the server re-sends what was not acknowledged;
//   duplicates are dropped by `seq`), and `chat.receipt delivered` is sent for what arrived;
// - `PeerCall`: an RTCPeerConnection wired to `signal` frames with the "perfect
//   negotiation" pattern, so both sides may call at the same moment (glare) and still connect.
//
// Client-side events (not from the server): "state" ({state: connecting|open|reconnecting|closed,
// code, reason}), "joined" (the `join` reply, after every join and re-join) and "rejoin_failed".

const DEFAULTS = {
  requestTimeout: 10000, // ms a request waits for its reply
  minBackoff: 500, // ms before the first reconnect attempt
  maxBackoff: 10000, // ms, the longest wait between attempts
  pingInterval: 20000, // ms between keep-alive `ping` requests (0: none)
  receiptDelay: 100, // ms to batch `delivered` receipts
  sendRetries: 5, // times `sendChat` re-sends (same client_id) across reconnects
};

// Close codes after which reconnecting with the same token cannot help.
const FATAL_CLOSE = new Set([4001, 4003]);

export class ParleyError extends Error {
  constructor(code, message, frame = null) {
    super(`${code}: ${message}`);
    this.name = "ParleyError";
    this.code = code;
    this.frame = frame;
  }
}

function randomId() {
  if (globalThis.crypto && crypto.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

export class Parley extends EventTarget {
  /**
   * @param {string} url  the WebSocket URL, e.g. ws://127.0.0.1:8080/ws
   * @param {object} options  `token` (a string, or a function returning a token or a Promise of
   *   one, called before every connection attempt) and any of DEFAULTS.
   */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    this.state = "idle";
    this.welcome = null;
    this._ws = null;
    this._refs = 0;
    this._pending = new Map(); // ref -> {resolve, reject, timer}
    this._sessions = new Map(); // session id -> {seen, delivered, read, own: Set<seq>}
    this._handlers = new Map(); // user fn -> {type, listener}
    this._openWaiters = [];
    this._attempt = 0;
    this._reconnectTimer = null;
    this._pingTimer = null;
    this._receiptTimer = null;
    this._closedByUser = false;
    this._firstConnect = null;
  }

  // ---------------------------------------------------------------- events

  /** Call `fn(frame)` for every event of `type` ("*": all). Returns a function that unsubscribes. */
  on(type, fn) {
    const listener = (event) => fn(event.detail);
    this._handlers.set(fn, { type, listener });
    this.addEventListener(type, listener);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    const entry = this._handlers.get(fn);
    if (entry && entry.type === type) {
      this.removeEventListener(type, entry.listener);
      this._handlers.delete(fn);
    }
  }

  /** The next event of `type` for which `predicate(frame)` holds; rejects after `timeoutMs`. */
  once(type, predicate = () => true, timeoutMs = this.options.requestTimeout) {
    return new Promise((resolve, reject) => {
      const fn = (frame) => {
        if (!predicate(frame)) return;
        clearTimeout(timer);
        this.off(type, fn);
        resolve(frame);
      };
      const timer = setTimeout(() => {
        this.off(type, fn);
        reject(new ParleyError("timeout", `no ${type} event within ${timeoutMs} ms`));
      }, timeoutMs);
      this.on(type, fn);
    });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
    this.dispatchEvent(new CustomEvent("*", { detail }));
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("state", { type: "state", state, ...extra });
  }

  // ---------------------------------------------------------------- connection

  /** Connect (once); resolves with the `welcome` frame. Later drops reconnect by themselves. */
  connect() {
    if (!this._firstConnect) {
      this._closedByUser = false;
      this._firstConnect = new Promise((resolve, reject) => {
        this._openWaiters.push({ resolve, reject, first: true });
      });
      this._open();
    }
    return this._firstConnect;
  }

  /** Close for good: no reconnect; pending requests reject with "disconnected". */
  close() {
    this._closedByUser = true;
    clearTimeout(this._reconnectTimer);
    this._stopTimers();
    if (this._ws) this._ws.close(1000, "client closed");
    this._failPending("disconnected", "the client was closed");
    this._settleWaiters(new ParleyError("disconnected", "the client was closed"));
    this._setState("closed", { code: 1000, reason: "client closed" });
  }

  async _open() {
    this._setState(this._attempt === 0 ? "connecting" : "reconnecting", { attempt: this._attempt });
    let token = this.options.token;
    try {
      if (typeof token === "function") token = await token();
    } catch (err) {
      this._scheduleReconnect(0, String(err));
      return;
    }
    if (this._closedByUser) return;
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this._scheduleReconnect(0, String(err));
      return;
    }
    this._ws = ws;
    let welcomed = false;
    ws.onopen = () => ws.send(JSON.stringify({ type: "hello", token }));
    ws.onmessage = (message) => {
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return;
      }
      if (!welcomed) {
        if (frame.type !== "welcome") return;
        welcomed = true;
        this._onWelcome(frame);
        return;
      }
      this._onFrame(frame);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._stopTimers();
      this._failPending("disconnected", `connection closed (${event.code})`);
      if (this._closedByUser) return;
      const fatal = FATAL_CLOSE.has(event.code) && typeof this.options.token !== "function";
      if (fatal) {
        const error = new ParleyError(event.code === 4001 ? "unauthorized" : "forbidden", event.reason || "closed");
        this._settleWaiters(error);
        this._setState("closed", { code: event.code, reason: event.reason });
        return;
      }
      this._scheduleReconnect(event.code, event.reason);
    };
  }

  _scheduleReconnect(code, reason) {
    const { minBackoff, maxBackoff } = this.options;
    const base = Math.min(maxBackoff, minBackoff * 2 ** this._attempt);
    const delay = base / 2 + Math.random() * (base / 2); // "equal jitter"
    this._attempt += 1;
    this._setState("reconnecting", { code, reason, attempt: this._attempt, delay });
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => this._open(), delay);
  }

  async _onWelcome(frame) {
    const reconnected = this._attempt > 0 && this.welcome !== null;
    this.welcome = frame;
    this._attempt = 0;
    this._setState("open", { user: frame.user, connection: frame.connection, reconnected });
    this._startPing();
    this._settleWaiters(null, frame);
    if (reconnected) await this._rejoinAll();
  }

  _settleWaiters(error, value) {
    const waiters = this._openWaiters;
    this._openWaiters = [];
    for (const waiter of waiters) {
      if (error) waiter.reject(error);
      else waiter.resolve(value);
    }
  }

  /** Resolves when the connection is open (welcomed), or rejects after `timeoutMs`. */
  waitOpen(timeoutMs = this.options.requestTimeout) {
    if (this.state === "open") return Promise.resolve(this.welcome);
    if (this.state === "closed") return Promise.reject(new ParleyError("disconnected", "the client is closed"));
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject };
      const timer = setTimeout(() => {
        this._openWaiters = this._openWaiters.filter((w) => w !== waiter);
        reject(new ParleyError("timeout", "not connected"));
      }, timeoutMs);
      waiter.resolve = (value) => { clearTimeout(timer); resolve(value); };
      waiter.reject = (error) => { clearTimeout(timer); reject(error); };
      this._openWaiters.push(waiter);
    });
  }

  _startPing() {
    const interval = this.options.pingInterval;
    if (!interval) return;
    this._pingTimer = setInterval(() => {
      // A ping that goes unanswered means the socket is dead even if the browser has not noticed.
      this.request("ping", {}, { timeout: Math.min(interval, 10000) }).catch((err) => {
        if (err.code === "timeout" && this._ws) this._ws.close(4000, "ping timeout");
      });
    }, interval);
  }

  _stopTimers() {
    clearInterval(this._pingTimer);
    this._pingTimer = null;
  }

  _failPending(code, message) {
    const pending = this._pending;
    this._pending = new Map();
    for (const entry of pending.values()) {
      clearTimeout(entry.timer);
      entry.reject(new ParleyError(code, message));
    }
  }

  // ---------------------------------------------------------------- requests

  /**
   * Send a request and resolve with its `ok` frame; reject with ParleyError (the server's
   * `code`, or "timeout" / "disconnected"). Waits for the connection if it is reconnecting.
   */
  async request(type, fields = {}, { timeout = this.options.requestTimeout } = {}) {
    const started = Date.now();
    if (this.state !== "open") await this.waitOpen(timeout);
    const ws = this._ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) throw new ParleyError("disconnected", "not connected");
    const ref = `r${++this._refs}`;
    const remaining = Math.max(1, timeout - (Date.now() - started));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(ref);
        reject(new ParleyError("timeout", `no reply to ${type} within ${timeout} ms`));
      }, remaining);
      this._pending.set(ref, { resolve, reject, timer });
      ws.send(JSON.stringify({ ...fields, type, ref }));
    });
  }

  _onFrame(frame) {
    const ref = frame.ref;
    if (ref !== undefined && ref !== null && (frame.type === "ok" || frame.type === "error")) {
      const entry = this._pending.get(ref);
      if (entry) {
        this._pending.delete(ref);
        clearTimeout(entry.timer);
        if (frame.type === "ok") entry.resolve(frame);
        else entry.reject(new ParleyError(frame.code, frame.message, frame));
      }
      return;
    }
    if (frame.type === "chat.message" && !this._acceptMessage(frame)) return; // a duplicate
    if (frame.type === "replaced") this._sessions.delete(frame.session); // another tab took over
    this._emit(frame.type, frame);
  }

  // ---------------------------------------------------------------- sessions and chat

  _track(session) {
    let entry = this._sessions.get(session);
    if (!entry) {
      entry = { seen: 0, delivered: 0, read: 0, own: new Set() };
      this._sessions.set(session, entry);
    }
    return entry;
  }

  /** Messages arrive with strictly increasing `seq`; anything at or below the last seen is a repeat. */
  _acceptMessage(frame) {
    const entry = this._sessions.get(frame.session);
    if (!entry) return true;
    if (frame.seq <= entry.seen) return false;
    entry.seen = frame.seq;
    this._scheduleReceipts();
    if (entry.own.has(frame.seq)) {
      entry.own.delete(frame.seq);
      return false; // our own message, re-sent after a reconnect: the caller already has it
    }
    return true;
  }

  _scheduleReceipts() {
    if (this._receiptTimer) return;
    this._receiptTimer = setTimeout(() => {
      this._receiptTimer = null;
      for (const [session, entry] of this._sessions) {
        if (entry.seen > entry.delivered) {
          const seq = entry.seen;
          this.request("chat.receipt", { session, kind: "delivered", seq })
            .then(() => { entry.delivered = Math.max(entry.delivered, seq); })
            .catch(() => {}); // re-sent after the next join
        }
      }
    }, this.options.receiptDelay);
  }

  /** Join a session; it is re-joined after every reconnect until `leave`. Resolves with the `ok`. */
  async join(session) {
    this._track(session);
    try {
      const reply = await this.request("join", { session });
      this._emit("joined", { type: "joined", ...reply });
      return reply;
    } catch (err) {
      if (err.code !== "timeout" && err.code !== "disconnected") this._sessions.delete(session);
      throw err;
    }
  }

  async _rejoinAll() {
    for (const session of [...this._sessions.keys()]) {
      try {
        const reply = await this.request("join", { session });
        this._emit("joined", { type: "joined", ...reply, rejoined: true });
      } catch (err) {
        if (err.code === "disconnected" || err.code === "timeout") return; // the next reconnect retries
        this._sessions.delete(session);
        this._emit("rejoin_failed", { type: "rejoin_failed", session, code: err.code, message: err.message });
      }
    }
  }

  async leave(session) {
    this._sessions.delete(session);
    return this.request("leave", { session });
  }

  /** Sessions this client keeps joined. */
  get sessions() {
    return [...this._sessions.keys()];
  }

  /** The highest chat `seq` this client has seen in `session`. */
  lastSeq(session) {
    return this._sessions.get(session)?.seen ?? 0;
  }

  /**
   * Send a chat message. The same `client_id` is re-sent after a reconnect, so a message is
   * stored once however often the network fails. Resolves with the `ok` (`id`, `seq`, `created_at`).
   */
  async sendChat(session, body, { clientId = randomId() } = {}) {
    let lastError;
    for (let attempt = 0; attempt <= this.options.sendRetries; attempt++) {
      try {
        const reply = await this.request("chat.send", { session, client_id: clientId, body });
        const entry = this._sessions.get(session);
        if (entry && reply.seq > entry.seen) entry.own.add(reply.seq);
        return reply;
      } catch (err) {
        lastError = err;
        if (err.code !== "disconnected" && err.code !== "timeout" && err.code !== "not_joined") throw err;
        await this.waitOpen(this.options.maxBackoff * 3).catch(() => {});
        if (err.code === "not_joined") await this.join(session).catch(() => {});
      }
    }
    throw lastError;
  }

  /** Older messages, oldest first (`beforeSeq` / `afterSeq`, `limit` ≤ 200). */
  async history(session, { beforeSeq, afterSeq, limit = 50 } = {}) {
    const fields = { session, limit };
    if (beforeSeq !== undefined) fields.before_seq = beforeSeq;
    if (afterSeq !== undefined) fields.after_seq = afterSeq;
    return (await this.request("chat.history", fields)).messages;
  }

  /** Raise the read mark (only ever forward). */
  async markRead(session, seq) {
    const entry = this._track(session);
    if (seq <= entry.read) return null;
    entry.read = seq;
    return this.request("chat.receipt", { session, kind: "read", seq });
  }

  setTyping(session, active) {
    return this.request("typing", { session, active: Boolean(active) });
  }

  editChat(session, id, body) {
    return this.request("chat.edit", { session, id, body });
  }

  deleteChat(session, id) {
    return this.request("chat.delete", { session, id });
  }

  signal(session, to, kind, payload = null) {
    return this.request("signal", { session, to, kind, payload });
  }

  endSession(session) {
    return this.request("session.end", { session });
  }
}

// -------------------------------------------------------------------- ICE servers

/** `iceServers` for RTCPeerConnection from GET /api/turn (STUN, and TURN with coturn credentials). */
export async function fetchIceServers(baseUrl, token) {
  const response = await fetch(new URL("/api/turn", baseUrl), { headers: { Authorization: `Bearer ${token}` } });
  if (!response.ok) throw new ParleyError("unauthorized", `GET /api/turn answered ${response.status}`);
  const body = await response.json();
  return (body.ice_servers || []).map((server) => {
    const entry = { urls: server.urls };
    if (server.username !== undefined) entry.username = server.username;
    if (server.credential !== undefined) entry.credential = server.credential;
    return entry;
  });
}

// -------------------------------------------------------------------- calls

/**
 * One peer-to-peer call in a session, negotiated over `signal` frames with "perfect negotiation":
 * each side may (re)negotiate at any time; when both offer at once, the impolite peer ignores the
 * incoming offer and the polite one rolls its own back and answers. Politeness is decided the same
 * way on both sides: the peer whose user id sorts later is polite.
 *
 *   const call = new PeerCall({ client, session, peer: "bob", iceServers, stream });
 *   call.addEventListener("track", (e) => (video.srcObject = e.detail.streams[0]));
 *   call.start();                 // adds local tracks: this side sends an offer
 *   // incoming: call.handleSignal(frame) for every `signal` frame from that peer
 *   call.hangup();
 *
 * Events: "track" (RTCTrackEvent), "state" ({connectionState}), "ended" ({reason, by}).
 */
export class PeerCall extends EventTarget {
  constructor({ client, session, peer, iceServers = [], stream = null, polite = undefined }) {
    super();
    this.client = client;
    this.session = session;
    this.peer = peer;
    this.me = client.welcome?.user;
    this.polite = polite ?? String(this.me) > String(peer);
    this.stream = stream;
    this.ended = false;
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.isSettingRemoteAnswerPending = false;
    this._queue = Promise.resolve(); // signals are handled one at a time, in order
    this._candidates = []; // candidates that came before any remote description
    this._started = false;
    this.pc = new RTCPeerConnection({ iceServers });
    this._wire();
  }

  _wire() {
    const pc = this.pc;
    pc.onnegotiationneeded = async () => {
      try {
        this.makingOffer = true;
        await pc.setLocalDescription();
        await this._send("offer", { type: pc.localDescription.type, sdp: pc.localDescription.sdp });
      } catch (err) {
        this._report(err);
      } finally {
        this.makingOffer = false;
      }
    };
    pc.onicecandidate = ({ candidate }) => {
      if (candidate) this._send("candidate", candidate.toJSON()).catch((err) => this._report(err));
    };
    pc.ontrack = (event) => this.dispatchEvent(new CustomEvent("track", { detail: event }));
    pc.onconnectionstatechange = () => {
      this.dispatchEvent(new CustomEvent("state", { detail: { connectionState: pc.connectionState } }));
      if (pc.connectionState === "failed") pc.restartIce();
    };
  }

  /** Attach local media (and a receive-only slot for a kind we do not send); starts negotiating. */
  start() {
    if (this._started) return;
    this._started = true;
    const stream = this.stream;
    const kinds = new Set();
    if (stream) {
      for (const track of stream.getTracks()) {
        // addTrack reuses a transceiver an incoming offer created for this kind, if there is one
        this.pc.addTrack(track, stream);
        kinds.add(track.kind);
      }
    }
    // Always ask for both kinds, so an audio-only side still sees the other's video.
    for (const kind of ["audio", "video"]) {
      if (kinds.has(kind)) continue;
      const present = this.pc.getTransceivers().some((t) => t.receiver.track.kind === kind);
      if (!present) this.pc.addTransceiver(kind, { direction: "recvonly" });
    }
  }

  /** Feed a `signal` frame from the peer (offer, answer, candidate or hangup). */
  handleSignal(frame) {
    this._queue = this._queue.then(() => this._handle(frame)).catch((err) => this._report(err));
    return this._queue;
  }

  async _handle({ kind, payload }) {
    if (this.ended) return;
    const pc = this.pc;
    if (kind === "hangup") {
      this._end("remote hangup", this.peer, false);
      return;
    }
    if (kind === "candidate") {
      if (!payload) return;
      if (!pc.remoteDescription) {
        this._candidates.push(payload);
        return;
      }
      try {
        await pc.addIceCandidate(payload);
      } catch (err) {
        if (!this.ignoreOffer) throw err; // candidates of an offer we ignored may fail
      }
      return;
    }
    // offer or answer
    const description = payload;
    const readyForOffer =
      !this.makingOffer && (pc.signalingState === "stable" || this.isSettingRemoteAnswerPending);
    const offerCollision = description.type === "offer" && !readyForOffer;
    this.ignoreOffer = !this.polite && offerCollision;
    if (this.ignoreOffer) return;
    this.isSettingRemoteAnswerPending = description.type === "answer";
    await pc.setRemoteDescription(description); // a polite peer rolls its own offer back here
    this.isSettingRemoteAnswerPending = false;
    if (description.type === "offer") {
      this.start(); // an incoming call: our tracks go into the transceivers the offer made
      await pc.setLocalDescription();
      await this._send("answer", { type: pc.localDescription.type, sdp: pc.localDescription.sdp });
    }
    const buffered = this._candidates;
    this._candidates = [];
    for (const candidate of buffered) {
      await pc.addIceCandidate(candidate).catch((err) => this._report(err));
    }
  }

  _send(kind, payload) {
    if (this.ended) return Promise.resolve();
    return this.client.signal(this.session, this.peer, kind, payload);
  }

  _report(err) {
    this.dispatchEvent(new CustomEvent("error", { detail: err }));
    if (globalThis.console) console.warn("parley call:", err);
  }

  /** End the call: tell the peer, close the connection, stop local media. */
  hangup(reason = "hangup") {
    this._end(reason, this.me, true);
  }

  _end(reason, by, notify) {
    if (this.ended) return;
    if (notify) this.client.signal(this.session, this.peer, "hangup", { reason }).catch(() => {});
    this.ended = true;
    this.pc.close();
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    this.dispatchEvent(new CustomEvent("ended", { detail: { reason, by } }));
  }

  /** Inbound RTP bytes per kind: {audio, video}. */
  async inboundBytes() {
    const totals = { audio: 0, video: 0 };
    const stats = await this.pc.getStats();
    stats.forEach((report) => {
      if (report.type === "inbound-rtp" && report.kind in totals) totals[report.kind] += report.bytesReceived || 0;
    });
    return totals;
  }
}
