// The demo page: sign in (dev mode), create or join a session, call, chat, watch the bill.
// Everything it does over the wire goes through parley.js; this file is only the page.
import { Parley, PeerCall, fetchIceServers } from "./parley.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const TYPING_IDLE_MS = 3000; // stop "typing" this long after the last keystroke
const TYPING_REFRESH_MS = 2500; // re-send typing:true while typing (the server forgets after 6 s)
const PEER_LEFT_GRACE_MS = 8000; // a peer that left mid-call may come back (reconnect)

// Everything the page knows; `window.parleyDemo` lets tests and curious people look.
const S = {
  user: null,
  token: null,
  client: null,
  sessionId: null,
  session: null,
  online: new Set(), // users joined to the session right now
  messages: new Map(), // seq -> message
  pending: new Map(), // client_id -> {body}
  marks: new Map(), // user -> {delivered, read}
  typing: new Map(), // user -> timer
  billing: null,
  call: null, // the PeerCall in progress
  callState: "idle",
  ringing: null, // {from, signals: []} while an incoming call waits for an answer
  iceServers: null,
  peerLeftTimer: null,
};
window.parleyDemo = S;

// ------------------------------------------------------------------ small helpers

function show(view) {
  for (const id of ["signin-view", "lobby-view", "session-view"]) $(id).hidden = id !== view;
}

function notify(text, { error = false, ms = 5000 } = {}) {
  const box = $("notice");
  box.textContent = text;
  box.classList.toggle("error", error);
  box.hidden = false;
  clearTimeout(notify.timer);
  if (ms) notify.timer = setTimeout(() => (box.hidden = true), ms);
}

async function api(path, { method = "GET", body, token = S.token } = {}) {
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = data.error?.message || `${method} ${path}: ${response.status}`;
    const err = new Error(message);
    err.status = response.status;
    throw err;
  }
  return data;
}

async function devToken(user, admin = false) {
  const response = await fetch(`/api/dev/token?user=${encodeURIComponent(user)}${admin ? "&admin=1" : ""}`);
  if (response.status === 404) throw new Error("This server is not in development mode: paste a token instead.");
  const data = await response.json();
  if (!response.ok) throw new Error(data.error?.message || "could not get a token");
  return data.token;
}

function wsUrl() {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
}

function setUrl(session) {
  const url = new URL(location.href);
  url.searchParams.delete("user");
  if (session) url.searchParams.set("session", session);
  else url.searchParams.delete("session");
  history.replaceState(null, "", url);
}

function inviteLink(session) {
  return `${location.origin}/?session=${encodeURIComponent(session)}`;
}

function pad(n) {
  return String(n).padStart(2, "0");
}

function formatDuration(ms) {
  const total = Math.floor(ms / 1000);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  return h ? `${h}:${pad(m)}:${pad(s)}` : `${pad(m)}:${pad(s)}`;
}

function formatMoney(minor, currency) {
  try {
    const format = new Intl.NumberFormat(undefined, { style: "currency", currency });
    const digits = format.resolvedOptions().maximumFractionDigits;
    return format.format(minor / 10 ** digits);
  } catch {
    return `${minor} ${currency} (minor units)`;
  }
}

function timeOf(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

// ------------------------------------------------------------------ sign in

async function signIn(user, token) {
  S.user = user;
  S.token = token;
  sessionStorage.setItem("parley.user", user);
  if (token) sessionStorage.setItem("parley.token", token);
  $("me").textContent = user;
  $("me").hidden = false;
  $("signout").hidden = false;
  const client = new Parley(wsUrl(), { token });
  S.client = client;
  client.on("state", onConnectionState);
  client.on("presence", onPresence);
  client.on("joined", onJoined);
  client.on("chat.message", onChatMessage);
  client.on("chat.updated", onChatChanged);
  client.on("chat.deleted", onChatChanged);
  client.on("receipt", onReceipt);
  client.on("typing", onTyping);
  client.on("session", onSessionEvent);
  client.on("billing", onBilling);
  client.on("signal", onSignal);
  client.on("replaced", onReplaced);
  client.on("rejoin_failed", (f) => notify(`Could not rejoin the session: ${f.message}`, { error: true, ms: 0 }));
  await client.connect();
  S.user = client.welcome.user; // the server's word on who we are
  $("me").textContent = S.user;
  const session = params.get("session");
  if (session) await openSession(session);
  else await showLobby();
}

function signOut() {
  if (S.call) S.call.hangup("signed out");
  S.client?.close();
  sessionStorage.removeItem("parley.user");
  sessionStorage.removeItem("parley.token");
  location.href = "/";
}

function onConnectionState({ state, attempt }) {
  const pill = $("connection");
  pill.dataset.state = state;
  pill.textContent = { open: "online", connecting: "connecting…", reconnecting: `reconnecting…`, closed: "offline" }[state] || state;
  if (state === "reconnecting" && attempt > 2) pill.textContent = `reconnecting (${attempt})…`;
}

$("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const user = $("name-input").value.trim();
  if (!user) return;
  try {
    await signIn(user, await devToken(user));
  } catch (err) {
    notify(err.message, { error: true });
  }
});

$("token-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("token-input").value.trim();
  try {
    const claims = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    await signIn(claims.sub, token);
  } catch (err) {
    notify(`That token did not work: ${err.message}`, { error: true });
  }
});

$("signout").addEventListener("click", signOut);

// ------------------------------------------------------------------ lobby

async function showLobby() {
  show("lobby-view");
  setUrl(null);
  $("create-payer").value ||= S.user;
  const list = $("my-sessions");
  list.textContent = "";
  try {
    const { items } = await api("/api/sessions?limit=20");
    const open = items.filter((s) => s.state === "active" || s.state === "scheduled");
    if (!open.length) list.innerHTML = '<li class="muted">No open sessions yet.</li>';
    for (const s of open) {
      const li = document.createElement("li");
      li.dataset.session = s.id;
      const label = document.createElement("span");
      label.textContent = `${s.payer} → ${s.provider} · ${s.state}`;
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Open";
      button.addEventListener("click", () => openSession(s.id));
      li.append(label, button);
      list.append(li);
    }
  } catch (err) {
    list.innerHTML = '<li class="muted">Could not list sessions.</li>';
  }
}

$("create-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = $("create-form").querySelector("button");
  button.disabled = true;
  try {
    const admin = await devToken(S.user, true);
    const guests = $("create-guests").value.split(",").map((g) => g.trim()).filter(Boolean);
    const session = await api("/api/sessions", {
      method: "POST",
      token: admin,
      body: {
        payer: $("create-payer").value.trim(),
        provider: $("create-provider").value.trim(),
        rate_per_minute: Number($("create-rate").value),
        currency: $("create-currency").value.trim().toUpperCase(),
        guests,
      },
    });
    await api(`/api/sessions/${session.id}/start`, { method: "POST", token: admin });
    await openSession(session.id);
  } catch (err) {
    notify(`Could not create the session: ${err.message}`, { error: true });
  } finally {
    button.disabled = false;
  }
});

$("join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  let value = $("join-input").value.trim();
  try {
    value = new URL(value).searchParams.get("session") || value;
  } catch {
    // a bare session id
  }
  openSession(value);
});

// ------------------------------------------------------------------ the session

async function openSession(sessionId) {
  let reply;
  try {
    reply = await S.client.join(sessionId);
  } catch (err) {
    const why = { forbidden: "you are not a participant of that session", not_found: "there is no such session",
      conflict: `that session is ${err.frame?.state || "over"}` }[err.code] || err.message;
    notify(`Cannot join: ${why}.`, { error: true, ms: 8000 });
    await showLobby();
    return;
  }
  S.sessionId = sessionId;
  S.messages.clear();
  S.pending.clear();
  S.marks.clear();
  $("chat-list").textContent = "";
  setUrl(sessionId);
  $("invite-link").value = inviteLink(sessionId);
  show("session-view");
  applyJoin(reply);
  await loadHistory(reply.last_seq);
  await loadBilling();
}

function applyJoin(reply) {
  S.session = reply.session;
  S.online = new Set(reply.participants);
  renderSession();
  renderPeople();
}

function onJoined(reply) {
  if (reply.session?.id !== S.sessionId) return;
  applyJoin(reply);
  if (reply.rejoined) notify("Reconnected.", { ms: 2000 });
}

async function loadHistory(lastSeq) {
  if (!lastSeq) return;
  try {
    const messages = await S.client.history(S.sessionId, { beforeSeq: lastSeq + 1, limit: 100 });
    for (const message of messages) addMessage(message);
    markRead();
  } catch (err) {
    notify(`Could not load the chat history: ${err.message}`, { error: true });
  }
}

async function loadBilling() {
  try {
    const bill = await api(`/api/sessions/${S.sessionId}/billing`);
    if (!S.billing || bill.final) renderBilling(bill);
  } catch {
    renderBilling(null);
  }
}

function isPayerOrProvider(user = S.user) {
  return S.session && (user === S.session.payer || user === S.session.provider);
}

function renderSession() {
  const s = S.session;
  if (!s) return;
  $("session-title").textContent = `${s.payer} → ${s.provider}`;
  const badge = $("session-state");
  badge.textContent = s.state;
  badge.dataset.state = s.state;
  const over = s.state === "ended" || s.state === "cancelled";
  $("start-session").hidden = s.state !== "scheduled";
  $("end-session").hidden = over;
  $("end-session").textContent = s.state === "scheduled" ? "Cancel session" : "End session";
  $("call-button").disabled = over;
  $("chat-input").disabled = over;
  $("chat-send").disabled = over;
  const ended = $("session-ended");
  if (over) {
    const reason = s.end_reason && s.end_reason !== "ended" ? ` (${s.end_reason.replace("_", " ")})` : "";
    const bill = S.billing ? ` · ${formatDuration(S.billing.billable_ms)} billed, ${formatMoney(S.billing.amount_minor, s.currency)}` : "";
    ended.textContent = `This session has ${s.state === "ended" ? "ended" : "been cancelled"}${reason}${bill}.`;
    ended.dataset.reason = s.end_reason || "";
    ended.hidden = false;
  } else {
    ended.hidden = true;
  }
  if (!S.billing) renderBilling(null);
}

function renderPeople() {
  const s = S.session;
  const list = $("participants");
  list.textContent = "";
  const roles = [[s.payer, "payer"], [s.provider, "provider"], ...s.guests.map((g) => [g, "guest"])];
  for (const [user, role] of roles) {
    const li = document.createElement("li");
    li.dataset.user = user;
    li.dataset.online = String(S.online.has(user));
    li.dataset.testid = `person-${user}`;
    li.innerHTML = '<span class="dot"></span><span class="avatar"></span><span class="name"></span><span class="role"></span>';
    li.querySelector(".avatar").textContent = user.slice(0, 1);
    li.querySelector(".name").textContent = user === S.user ? `${user} (you)` : user;
    li.querySelector(".role").textContent = S.online.has(user) ? `${role} · here` : role;
    list.append(li);
  }
  // whom the Call button calls
  const others = [...S.online].filter((u) => u !== S.user);
  const select = $("call-peer");
  const before = select.value;
  select.textContent = "";
  for (const user of others) select.append(new Option(user, user));
  if (others.includes(before)) select.value = before;
  select.hidden = others.length < 2;
  renderCallControls();
}

function onPresence(frame) {
  if (frame.session !== S.sessionId) return;
  if (frame.state === "joined") S.online.add(frame.user);
  else S.online.delete(frame.user);
  renderPeople();
  if (frame.state === "left") {
    clearTyping(frame.user);
    if (S.ringing?.from === frame.user) clearRinging();
    if (S.call?.peer === frame.user) {
      clearTimeout(S.peerLeftTimer);
      S.peerLeftTimer = setTimeout(() => {
        if (S.call?.peer === frame.user && !S.online.has(frame.user)) S.call.hangup("peer left");
      }, PEER_LEFT_GRACE_MS);
    }
  }
}

function onSessionEvent(frame) {
  if (frame.session?.id !== S.sessionId) return;
  S.session = frame.session;
  renderSession();
  renderPeople();
  if (frame.session.state === "ended" || frame.session.state === "cancelled") {
    if (S.call) S.call.hangup("session ended");
    clearRinging();
    loadBilling();
  }
}

function onReplaced(frame) {
  if (frame.session !== S.sessionId) return;
  if (S.call) S.call.hangup("opened elsewhere");
  notify("You opened this session in another window; this one has stepped aside.", { error: true, ms: 0 });
  $("call-button").disabled = true;
  $("chat-input").disabled = true;
}

$("copy-invite").addEventListener("click", async () => {
  const link = inviteLink(S.sessionId);
  try {
    await navigator.clipboard.writeText(link);
    notify("Invite link copied.", { ms: 2000 });
  } catch {
    $("invite-link").select();
    notify("Copy the invite link below.", { ms: 3000 });
  }
});

$("start-session").addEventListener("click", async () => {
  try {
    S.session = await api(`/api/sessions/${S.sessionId}/start`, { method: "POST" });
    renderSession();
  } catch (err) {
    notify(`Could not start: ${err.message}`, { error: true });
  }
});

$("end-session").addEventListener("click", async () => {
  const cancel = S.session?.state === "scheduled";
  if (!cancel && !confirm("End this session for everyone? Billing stops and is finalized.")) return;
  try {
    if (cancel) await api(`/api/sessions/${S.sessionId}/cancel`, { method: "POST" });
    else await S.client.endSession(S.sessionId);
  } catch (err) {
    notify(`Could not end the session: ${err.message}`, { error: true });
  }
});

$("leave-session").addEventListener("click", async () => {
  if (S.call) S.call.hangup("left");
  clearRinging();
  const session = S.sessionId;
  S.sessionId = null;
  S.session = null;
  S.billing = null;
  await S.client.leave(session).catch(() => {});
  await showLobby();
});

// ------------------------------------------------------------------ billing

const METER_AHEAD_MAX_MS = 15000; // never run the displayed meter further than this past the server's word

function onBilling(frame) {
  if (frame.session !== S.sessionId) return;
  S.billingAt = performance.now();
  renderBilling(frame);
  if (frame.final) renderSession(); // the ended banner names the final amount
}

function meterRunning() {
  const s = S.session;
  return Boolean(s && S.billing && !S.billing.final && s.state === "active"
    && S.online.has(s.payer) && S.online.has(s.provider) && S.billingAt);
}

// Between the server's billing ticks the displayed meter counts on by itself; every
// `billing` event resets it to the server's figure (data-billable-ms is always the server's).
setInterval(() => {
  if (!meterRunning()) return;
  const ahead = Math.min(METER_AHEAD_MAX_MS, performance.now() - S.billingAt);
  const ms = S.billing.billable_ms + ahead;
  const minor = Math.ceil((ms * S.session.rate_per_minute) / 60000);
  $("billing-time").textContent = formatDuration(ms);
  $("billing-amount").textContent = formatMoney(Math.max(minor, S.billing.amount_minor), S.billing.currency || S.session.currency);
}, 1000);

function renderBilling(bill) {
  const box = $("billing");
  const s = S.session;
  const note = $("billing-note");
  if (bill) S.billing = bill;
  bill = S.billing;
  if (!bill) {
    $("billing-time").textContent = "00:00";
    $("billing-amount").textContent = s ? formatMoney(0, s.currency) : "—";
  } else {
    box.dataset.billableMs = String(bill.billable_ms);
    box.dataset.amountMinor = String(bill.amount_minor);
    box.dataset.final = String(Boolean(bill.final));
    $("billing-time").textContent = formatDuration(bill.billable_ms);
    $("billing-amount").textContent = formatMoney(bill.amount_minor, bill.currency || s?.currency);
  }
  if (!s) return;
  const rate = `${formatMoney(s.rate_per_minute, s.currency)} per minute`;
  if (bill?.final) note.textContent = `Final bill · ${rate}`;
  else if (!isPayerOrProvider()) note.textContent = `${rate} · the live meter is shown to the payer and the provider`;
  else if (s.state !== "active") note.textContent = `${rate} · starts when the session is active`;
  else if (S.online.has(s.payer) && S.online.has(s.provider)) note.textContent = `${rate} · running while both are here`;
  else note.textContent = `${rate} · paused until ${S.online.has(s.payer) ? s.provider : s.payer} joins`;
  if (bill?.warning === "limit_near") note.textContent += " · the prepaid limit is near";
}

// ------------------------------------------------------------------ chat

function tickStatus(message) {
  if (message.pending) return "pending";
  let status = "sent";
  for (const [user, marks] of S.marks) {
    if (user === S.user) continue;
    if (marks.read >= message.seq) return "read";
    if (marks.delivered >= message.seq) status = "delivered";
  }
  return status;
}

const TICKS = { pending: "🕓", sent: "✓", delivered: "✓✓", read: "✓✓" };

function renderMessage(li, message) {
  const mine = message.sender === S.user;
  li.dataset.seq = message.seq ?? "";
  li.dataset.sender = message.sender;
  li.dataset.mine = String(mine);
  li.dataset.deleted = String(Boolean(message.deleted));
  li.textContent = "";
  const bubble = document.createElement("span");
  bubble.className = "bubble";
  bubble.textContent = message.deleted ? "message deleted" : message.body;
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = `${mine ? "" : `${message.sender} · `}${timeOf(message.created_at)}${message.edited_at ? " · edited" : ""}`;
  if (mine) {
    const ticks = document.createElement("span");
    const status = tickStatus(message);
    ticks.className = "ticks";
    ticks.dataset.testid = "ticks";
    ticks.dataset.status = status;
    ticks.title = status;
    ticks.textContent = TICKS[status];
    meta.append(ticks);
    li.dataset.status = status;
  }
  li.append(bubble, meta);
}

function addMessage(message) {
  if (message.seq && S.messages.has(message.seq)) return;
  S.messages.set(message.seq, message);
  const list = $("chat-list");
  const li = document.createElement("li");
  li.dataset.testid = "chat-message";
  renderMessage(li, message);
  // keep the list in seq order (history can land after a live message)
  const after = [...list.children].find((el) => el.dataset.seq && Number(el.dataset.seq) > message.seq);
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 60;
  list.insertBefore(li, after || list.querySelector("li[data-pending]") || null);
  if (nearBottom || message.sender === S.user) list.scrollTop = list.scrollHeight;
}

function rerenderTicks() {
  for (const li of $("chat-list").querySelectorAll('li[data-mine="true"][data-seq]')) {
    const message = S.messages.get(Number(li.dataset.seq));
    if (message) renderMessage(li, message);
  }
}

function onChatMessage(frame) {
  if (frame.session !== S.sessionId) return;
  clearTyping(frame.sender);
  addMessage(frame);
  markRead();
}

function onChatChanged(frame) {
  if (frame.session !== S.sessionId) return;
  const message = { ...S.messages.get(frame.seq), ...frame };
  S.messages.set(frame.seq, message);
  const li = $("chat-list").querySelector(`li[data-seq="${frame.seq}"]`);
  if (li) renderMessage(li, message);
}

function onReceipt(frame) {
  if (frame.session !== S.sessionId) return;
  const marks = S.marks.get(frame.user) || { delivered: 0, read: 0 };
  marks[frame.kind] = Math.max(marks[frame.kind], frame.seq);
  if (frame.kind === "read") marks.delivered = Math.max(marks.delivered, frame.seq);
  S.marks.set(frame.user, marks);
  rerenderTicks();
}

function markRead() {
  if (!S.sessionId || document.visibilityState !== "visible" || !S.messages.size) return;
  const last = Math.max(...S.messages.keys());
  S.client.markRead(S.sessionId, last).catch(() => {});
}
document.addEventListener("visibilitychange", markRead);
window.addEventListener("focus", markRead);

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("chat-input");
  const body = input.value.trim();
  if (!body || !S.sessionId) return;
  input.value = "";
  stopTyping();
  const clientId = crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`;
  const li = document.createElement("li");
  li.dataset.pending = clientId;
  li.dataset.testid = "chat-message";
  renderMessage(li, { sender: S.user, body, pending: true, created_at: new Date().toISOString() });
  $("chat-list").append(li);
  $("chat-list").scrollTop = $("chat-list").scrollHeight;
  try {
    const reply = await S.client.sendChat(S.sessionId, body, { clientId });
    li.remove();
    addMessage(reply.message || { id: reply.id, seq: reply.seq, sender: S.user, body, created_at: reply.created_at });
  } catch (err) {
    li.remove();
    notify(`Message not sent: ${err.message}`, { error: true });
    input.value ||= body;
  }
});

// typing: true while keys are being pressed, refreshed, and false after a pause or on send
let typingActive = false;
let typingSentAt = 0;
let typingIdle = null;

$("chat-input").addEventListener("input", () => {
  if (!S.sessionId) return;
  const now = Date.now();
  if (!$("chat-input").value) {
    stopTyping();
    return;
  }
  if (!typingActive || now - typingSentAt > TYPING_REFRESH_MS) {
    typingActive = true;
    typingSentAt = now;
    S.client.setTyping(S.sessionId, true).catch(() => {});
  }
  clearTimeout(typingIdle);
  typingIdle = setTimeout(stopTyping, TYPING_IDLE_MS);
});

function stopTyping() {
  clearTimeout(typingIdle);
  if (!typingActive) return;
  typingActive = false;
  if (S.sessionId) S.client.setTyping(S.sessionId, false).catch(() => {});
}

function onTyping(frame) {
  if (frame.session !== S.sessionId || frame.user === S.user) return;
  if (frame.active) {
    clearTimeout(S.typing.get(frame.user));
    S.typing.set(frame.user, setTimeout(() => clearTyping(frame.user), 8000)); // the server's timeout, plus slack
  } else {
    clearTyping(frame.user, false);
    S.typing.delete(frame.user);
  }
  renderTyping();
}

function clearTyping(user, render = true) {
  if (!S.typing.has(user)) return;
  clearTimeout(S.typing.get(user));
  S.typing.delete(user);
  if (render) renderTyping();
}

function renderTyping() {
  const users = [...S.typing.keys()];
  const box = $("typing-indicator");
  box.dataset.users = users.join(",");
  box.textContent = users.length === 0 ? "" : users.length === 1 ? `${users[0]} is typing…` : `${users.join(", ")} are typing…`;
}

// ------------------------------------------------------------------ calls

function setCallState(state, text) {
  S.callState = state;
  const status = $("call-status");
  status.dataset.state = state;
  status.textContent = text;
  renderCallControls();
}

function renderCallControls() {
  const inCall = Boolean(S.call);
  const over = !S.session || S.session.state === "ended" || S.session.state === "cancelled";
  const others = [...S.online].filter((u) => u !== S.user);
  $("call-button").hidden = inCall;
  $("call-button").disabled = over || others.length === 0 || Boolean(S.ringing);
  $("call-button").title = others.length ? "" : "Nobody else is here yet";
  $("hangup-button").hidden = !inCall;
  $("mute-button").hidden = !inCall || !S.call?.stream?.getAudioTracks().length;
  $("camera-button").hidden = !inCall || !S.call?.stream?.getVideoTracks().length;
  $("audio-only").disabled = inCall;
}

async function getMedia() {
  const wantVideo = !$("audio-only").checked;
  const attempts = wantVideo ? [{ audio: true, video: true }, { audio: true }, { video: true }] : [{ audio: true }];
  if (!navigator.mediaDevices?.getUserMedia) {
    notify("This page needs https (or localhost) for camera and microphone; receiving only.", { error: true });
    return null;
  }
  for (const constraints of attempts) {
    try {
      return await navigator.mediaDevices.getUserMedia(constraints);
    } catch (err) {
      if (err.name === "NotAllowedError") break;
    }
  }
  notify("No camera or microphone: you will see and hear the other side only.", { error: true });
  return null;
}

async function iceServers() {
  if (!S.iceServers) {
    try {
      S.iceServers = await fetchIceServers(location.origin, S.token);
    } catch {
      S.iceServers = [];
    }
  }
  return S.iceServers;
}

async function beginCall(peer, signals = []) {
  const stream = await getMedia();
  const servers = await iceServers();
  if (S.call || !S.sessionId) {
    stream?.getTracks().forEach((t) => t.stop());
    return;
  }
  const call = new PeerCall({ client: S.client, session: S.sessionId, peer, iceServers: servers, stream });
  S.call = call;
  const local = $("local-video");
  if (stream?.getVideoTracks().length) {
    local.srcObject = stream;
    local.dataset.live = "true";
  }
  $("remote-initial").textContent = peer.slice(0, 1);
  call.addEventListener("track", ({ detail }) => onRemoteTrack(detail));
  call.addEventListener("state", ({ detail }) => {
    if (call !== S.call) return;
    const state = detail.connectionState;
    if (state === "connected") setCallState("connected", `In a call with ${peer}`);
    else if (state === "disconnected") setCallState("calling", `Connection to ${peer} interrupted…`);
    else if (state === "failed") setCallState("calling", `Reconnecting to ${peer}…`);
  });
  call.addEventListener("ended", ({ detail }) => onCallEnded(call, detail));
  renderCallControls();
  call.start();
  // signals that came while we were getting the camera (an offer we accept, or the peer's offer in glare)
  const waiting = S.ringing?.from === peer ? S.ringing.signals : [];
  clearRinging();
  for (const frame of [...signals, ...waiting]) call.handleSignal(frame);
}

function onRemoteTrack(event) {
  const video = $("remote-video");
  const stream = event.streams[0] || video.srcObject || new MediaStream();
  if (!event.streams[0]) stream.addTrack(event.track);
  if (video.srcObject !== stream) video.srcObject = stream;
  video.play().catch(() => {});
  if (event.track.kind === "video") {
    const showVideo = () => $("stage").classList.add("has-video");
    event.track.addEventListener("unmute", showVideo);
    event.track.addEventListener("mute", () => $("stage").classList.remove("has-video"));
    event.track.addEventListener("ended", () => $("stage").classList.remove("has-video"));
    if (!event.track.muted) showVideo();
  }
}

function onCallEnded(call, { reason, by }) {
  if (call !== S.call) return;
  S.call = null;
  clearTimeout(S.peerLeftTimer);
  $("remote-video").srcObject = null;
  $("local-video").srcObject = null;
  delete $("local-video").dataset.live;
  $("stage").classList.remove("has-video");
  $("stage-caption").textContent = "No call";
  const who = by === S.user ? "You" : by;
  const text = reason === "remote hangup" ? `${call.peer} hung up`
    : reason === "hangup" ? "you hung up" : `${who} ended the call (${reason})`;
  setCallState("ended", `Call ended: ${text}`);
  $("call-status").dataset.reason = reason;
}

function onSignal(frame) {
  if (frame.session !== S.sessionId) return;
  const call = S.call;
  if (call && call.peer === frame.from) {
    call.handleSignal(frame);
    return;
  }
  if (S.ringing && S.ringing.from === frame.from) {
    if (frame.kind === "hangup") {
      clearRinging();
      setCallState("ended", `Missed call from ${frame.from}`);
    } else {
      S.ringing.signals.push(frame);
    }
    return;
  }
  if (frame.kind !== "offer") return; // candidates or a hangup of a call we no longer have
  if (call || S.ringing) {
    S.client.signal(S.sessionId, frame.from, "hangup", { reason: "busy" }).catch(() => {});
    return;
  }
  if (S.callState === "calling" && S.pendingPeer === frame.from) {
    // glare: we pressed Call too and are still getting the camera; our call takes these signals
    S.ringing = { from: frame.from, signals: [frame], glare: true };
    return;
  }
  S.ringing = { from: frame.from, signals: [frame] };
  $("incoming-from").textContent = frame.from;
  $("incoming").hidden = false;
  $("remote-initial").textContent = frame.from.slice(0, 1);
  setCallState("ringing", `${frame.from} is calling`);
}

function clearRinging() {
  S.ringing = null;
  $("incoming").hidden = true;
}

$("call-button").addEventListener("click", async () => {
  const peer = $("call-peer").value || [...S.online].find((u) => u !== S.user);
  if (!peer || S.call) return;
  S.pendingPeer = peer;
  setCallState("calling", `Calling ${peer}…`);
  $("stage-caption").textContent = `Calling ${peer}…`;
  $("remote-initial").textContent = peer.slice(0, 1);
  try {
    await beginCall(peer);
  } finally {
    S.pendingPeer = null;
  }
});

$("accept-call").addEventListener("click", async () => {
  if (!S.ringing) return;
  const { from } = S.ringing;
  $("incoming").hidden = true;
  setCallState("calling", `Connecting to ${from}…`);
  $("stage-caption").textContent = `Connecting to ${from}…`;
  await beginCall(from);
});

$("decline-call").addEventListener("click", () => {
  if (!S.ringing) return;
  const { from } = S.ringing;
  clearRinging();
  S.client.signal(S.sessionId, from, "hangup", { reason: "declined" }).catch(() => {});
  setCallState("idle", `You declined ${from}'s call`);
});

$("hangup-button").addEventListener("click", () => S.call?.hangup("hangup"));

$("mute-button").addEventListener("click", () => {
  const tracks = S.call?.stream?.getAudioTracks() || [];
  const muted = tracks.some((t) => t.enabled);
  tracks.forEach((t) => (t.enabled = !muted));
  $("mute-button").textContent = muted ? "Unmute" : "Mute";
});

$("camera-button").addEventListener("click", () => {
  const tracks = S.call?.stream?.getVideoTracks() || [];
  const off = tracks.some((t) => t.enabled);
  tracks.forEach((t) => (t.enabled = !off));
  $("camera-button").textContent = off ? "Camera on" : "Camera off";
});

window.addEventListener("pagehide", () => S.call?.hangup("page closed"));

// ------------------------------------------------------------------ start

(async function main() {
  const user = params.get("user") || sessionStorage.getItem("parley.user");
  const token = sessionStorage.getItem("parley.token");
  if (!user) {
    show("signin-view");
    $("name-input").focus();
    return;
  }
  try {
    const fresh = params.get("user") && params.get("user") !== sessionStorage.getItem("parley.user");
    await signIn(user, !fresh && token ? token : await devToken(user));
  } catch (err) {
    sessionStorage.removeItem("parley.token");
    show("signin-view");
    $("name-input").value = user;
    notify(err.message, { error: true });
  }
})();
