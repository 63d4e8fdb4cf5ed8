"""The demo page in real headless Chromium: two users, a video call, chat, billing, glare.

Playwright's async API is asyncio-only, and its sync objects belong to the thread
that made them. So one dedicated thread (a single-worker executor, one per module)
owns Playwright and the browser; each test runs its browser work there with
`await trio.to_thread.run_sync(...)`, while the server keeps serving in the test's
Trio nursery. See /work/shared/BROWSER_TESTING.md for the recipe and its pitfalls.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import require_system

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--autoplay-policy=no-user-gesture-required",
]
UI_TIMEOUT_MS = 15_000  # every Playwright wait is bounded by this
TEST_TIMEOUT = 90  # seconds for a whole test's browser work
BILLING_TICK = 0.5


class BrowserThread:
    """Playwright and one Chromium, owned by one thread; `run(fn)` calls fn(browser) there."""

    def __init__(self, executable: str) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="playwright")
        self._executable = executable
        self._playwright: Any = None
        self.browser: Any = None
        self._executor.submit(self._start).result(timeout=60)

    def _start(self) -> None:
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self.browser = self._playwright.chromium.launch(
            executable_path=self._executable, headless=True, args=CHROMIUM_ARGS,
        )

    def run(self, fn: Callable[[Any], Any]) -> Any:
        return self._executor.submit(fn, self.browser).result(timeout=TEST_TIMEOUT + 30)

    def close(self) -> None:
        def stop() -> None:
            try:
                if self.browser is not None:
                    self.browser.close()
            finally:
                if self._playwright is not None:
                    self._playwright.stop()

        self._executor.submit(stop).result(timeout=30)
        self._executor.shutdown(wait=True)


@pytest.fixture(scope="module")
def chromium() -> Iterator[BrowserThread]:
    executable = require_system("chromium", "the browser end-to-end tests drive Debian's Chromium")
    pytest.importorskip("playwright.sync_api")
    thread = BrowserThread(executable)
    try:
        yield thread
    finally:
        thread.close()


async def in_browser(chromium: BrowserThread, fn: Callable[[Any], Any]) -> Any:
    with trio.fail_after(TEST_TIMEOUT + 40):
        return await trio.to_thread.run_sync(chromium.run, fn, abandon_on_cancel=True)


# ---------------------------------------------------------------- page helpers (run in the browser thread)


def open_user(browser: Any, url: str) -> Any:
    context = browser.new_context(viewport={"width": 1180, "height": 820})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: dialog.accept())
    page.errors = errors  # type: ignore[attr-defined]
    page.goto(url)
    return page


def by_id(page: Any, name: str) -> Any:
    return page.get_by_test_id(name)


def wait_online(page: Any, user: str) -> None:
    page.locator(f'[data-testid="participants"] li[data-user="{user}"][data-online="true"]').wait_for()


def wait_connected(page: Any) -> None:
    page.wait_for_function(
        "() => window.parleyDemo.call && window.parleyDemo.call.pc.connectionState === 'connected'",
        timeout=UI_TIMEOUT_MS,
    )


def inbound(page: Any) -> dict[str, int]:
    return page.evaluate("() => window.parleyDemo.call.inboundBytes()")


def wait_media_flowing(page: Any, kinds: tuple[str, ...] = ("audio", "video")) -> dict[str, int]:
    """Poll getStats (wait_for_function does not await Promises) until every kind has bytes."""
    deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
    while True:
        totals = inbound(page)
        if all(totals[kind] > 0 for kind in kinds):
            return totals
        assert time.monotonic() < deadline, f"no inbound media yet: {totals}"
        time.sleep(0.1)


def assert_media_grows(pages: dict[str, Any], window: float = 1.5) -> dict[str, dict[str, int]]:
    first = {name: wait_media_flowing(page) for name, page in pages.items()}
    time.sleep(window)
    second = {name: inbound(page) for name, page in pages.items()}
    for name in pages:
        for kind in ("audio", "video"):
            assert second[name][kind] > first[name][kind], f"{name}: inbound {kind} did not grow: {first} {second}"
    return second


def billable_ms(page: Any) -> int:
    return int(by_id(page, "billing").get_attribute("data-billable-ms") or 0)


def wait_billing_above(page: Any, floor: int) -> int:
    page.wait_for_function(
        f"() => Number(document.querySelector('[data-testid=billing]').dataset.billableMs) > {floor}",
        timeout=UI_TIMEOUT_MS,
    )
    return billable_ms(page)


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(path), full_page=True)
    return path


def close_all(*pages: Any) -> None:
    for page in pages:
        errors = page.errors
        page.context.close()
        assert not errors, f"uncaught errors in the page: {errors}"


# ---------------------------------------------------------------- tests


async def test_two_users_call_chat_bill_and_hang_up(chromium, make_server):
    server = await make_server(billing_tick=BILLING_TICK)
    base = server.base_url

    def drive(browser: Any) -> dict[str, Any]:
        # alice signs in with the form and creates the session from the lobby, as a person would
        alice = open_user(browser, base + "/")
        by_id(alice, "name-input").fill("alice")
        by_id(alice, "signin-button").click()
        by_id(alice, "lobby-view").wait_for()
        assert by_id(alice, "create-payer").input_value() == "alice"
        by_id(alice, "create-provider").fill("bob")
        by_id(alice, "create-rate").fill("120")
        by_id(alice, "create-button").click()
        by_id(alice, "session-view").wait_for()
        invite = by_id(alice, "invite-link").input_value()
        assert "?session=" in invite
        assert by_id(alice, "session-state").inner_text().lower() == "active"

        # bob opens the invite link and picks his name
        bob = open_user(browser, invite)
        by_id(bob, "name-input").fill("bob")
        by_id(bob, "signin-button").click()
        by_id(bob, "session-view").wait_for()
        wait_online(alice, "bob")
        wait_online(bob, "alice")

        # the billing meter moves on both sides once both are here
        alice_ms = wait_billing_above(alice, 0)
        wait_billing_above(bob, 0)

        # a video call: alice calls, bob accepts
        by_id(alice, "call-button").click()
        by_id(bob, "incoming-call").wait_for()
        assert "alice" in by_id(bob, "incoming-call").inner_text()
        by_id(bob, "accept-button").click()
        wait_connected(alice)
        wait_connected(bob)
        by_id(alice, "call-status").and_(alice.locator('[data-state="connected"]')).wait_for()
        media = assert_media_grows({"alice": alice, "bob": bob})
        for page in (alice, bob):
            page.wait_for_function(
                "() => { const v = document.getElementById('remote-video');"
                " return v.videoWidth > 0 && !v.paused && v.currentTime > 0; }",
                timeout=UI_TIMEOUT_MS,
            )

        # chat: typing indicator, the message, then delivered/read ticks
        by_id(alice, "chat-input").press_sequentially("hello bob", delay=15)
        bob.locator('[data-testid="typing-indicator"][data-users="alice"]').wait_for()
        assert "alice is typing" in by_id(bob, "typing-indicator").inner_text()
        by_id(alice, "chat-send").click()
        bob.locator('[data-testid="chat-list"] li[data-sender="alice"]', has_text="hello bob").wait_for()
        bob.locator('[data-testid="typing-indicator"][data-users=""]').wait_for()
        alice.locator('[data-testid="chat-list"] li[data-mine="true"][data-status="read"]', has_text="hello bob").wait_for()

        by_id(bob, "chat-input").press_sequentially("hi alice, I can see you", delay=15)
        alice.locator('[data-testid="typing-indicator"][data-users="bob"]').wait_for()
        by_id(bob, "chat-input").press("Enter")
        alice.locator('[data-testid="chat-list"] li[data-sender="bob"]', has_text="I can see you").wait_for()
        bob.locator('[data-testid="chat-list"] li[data-mine="true"][data-status="read"]', has_text="I can see you").wait_for()
        assert alice.locator('[data-testid="chat-list"] li[data-seq]').count() == 2
        assert bob.locator('[data-testid="chat-list"] li[data-seq]').count() == 2

        # the meter kept moving during the call
        later_ms = wait_billing_above(alice, alice_ms + 500)
        amount = by_id(alice, "billing-amount").inner_text()
        assert "$" in amount or "US" in amount, amount

        shots = [screenshot(alice, "browser-call-alice.png"), screenshot(bob, "browser-call-bob.png")]

        # bob hangs up; alice sees the call end
        by_id(bob, "hangup-button").click()
        alice.locator('[data-testid="call-status"][data-state="ended"]').wait_for()
        assert "bob hung up" in by_id(alice, "call-status").inner_text()
        assert alice.evaluate("() => window.parleyDemo.call") is None
        bob.locator('[data-testid="call-status"][data-state="ended"]').wait_for()
        by_id(alice, "call-button").wait_for(state="visible")

        # alice ends the session; bob sees it end and the final bill
        by_id(alice, "end-session-button").click()
        by_id(bob, "session-ended").wait_for()
        assert "ended" in by_id(bob, "session-ended").inner_text()
        bob.locator('[data-testid="billing"][data-final="true"]').wait_for()
        assert by_id(bob, "chat-input").is_disabled()
        shots.append(screenshot(bob, "browser-ended-bob.png"))
        session_id = invite.split("session=")[1]
        close_all(alice, bob)
        return {"media": media, "billed_ms": later_ms, "shots": shots, "session": session_id}

    result = await in_browser(chromium, drive)
    for path in result["shots"]:
        assert path.stat().st_size > 10_000, path
    bill = (await server.http.get(f"/api/sessions/{result['session']}/billing", headers=server.auth("alice"))).json()
    assert bill["final"] is True
    assert bill["billable_ms"] >= result["billed_ms"]
    assert bill["amount_minor"] >= 1


async def test_glare_both_call_at_once_and_still_connect(chromium, server):
    session = await server.create_session("alice", "bob")
    await server.start_session(session["id"])
    base, sid = server.base_url, session["id"]

    # Test-only gate: each page holds incoming `signal` frames until both pages have sent their
    # own offer, so the two offers really cross (a true glare, not a near miss).
    gate = """() => {
        const c = window.parleyDemo.client;
        const emit = c._emit.bind(c);
        const held = [];
        window.sentKinds = [];
        const signal = c.signal.bind(c);
        c.signal = (s, to, kind, payload) => { window.sentKinds.push(kind); return signal(s, to, kind, payload); };
        window.gateOpen = false;
        c._emit = (type, detail) => {
            if (type === 'signal' && !window.gateOpen) { held.push([type, detail]); return; }
            emit(type, detail);
        };
        window.openGate = () => { window.gateOpen = true; for (const [t, d] of held.splice(0)) emit(t, d); };
    }"""

    def drive(browser: Any) -> dict[str, Any]:
        alice = open_user(browser, f"{base}/?user=alice&session={sid}")
        bob = open_user(browser, f"{base}/?user=bob&session={sid}")
        wait_online(alice, "bob")
        wait_online(bob, "alice")
        for page in (alice, bob):
            page.evaluate(gate)
        # both press Call at the same wall-clock instant (one clock on this machine)
        at = alice.evaluate("() => Date.now() + 400")
        for page in (alice, bob):
            page.evaluate(
                "(at) => setTimeout(() => document.querySelector('[data-testid=call-button]').click(), at - Date.now())",
                at,
            )
        for page in (alice, bob):
            page.wait_for_function("() => window.sentKinds.includes('offer')", timeout=UI_TIMEOUT_MS)
        states = [p.evaluate("() => window.parleyDemo.call.pc.signalingState") for p in (alice, bob)]
        assert states == ["have-local-offer", "have-local-offer"], states
        for page in (alice, bob):
            page.evaluate("() => window.openGate()")
        wait_connected(alice)
        wait_connected(bob)
        media = assert_media_grows({"alice": alice, "bob": bob}, window=1.0)
        politeness = {name: p.evaluate("() => window.parleyDemo.call.polite") for name, p in (("alice", alice), ("bob", bob))}
        assert by_id(alice, "incoming-call").is_hidden() and by_id(bob, "incoming-call").is_hidden()
        sent = {name: p.evaluate("() => window.sentKinds") for name, p in (("alice", alice), ("bob", bob))}
        shots = [screenshot(alice, "browser-glare-alice.png"), screenshot(bob, "browser-glare-bob.png")]
        by_id(alice, "hangup-button").click()
        bob.locator('[data-testid="call-status"][data-state="ended"]').wait_for()
        close_all(alice, bob)
        return {"media": media, "polite": politeness, "sent": sent, "shots": shots}

    result = await in_browser(chromium, drive)
    # ids sort alice < bob: alice is impolite (ignored bob's offer), bob polite (rolled back, answered)
    assert result["polite"] == {"alice": False, "bob": True}
    assert "answer" in result["sent"]["bob"]


async def test_one_side_audio_only(chromium, server):
    session = await server.create_session("alice", "bob")
    await server.start_session(session["id"])
    base, sid = server.base_url, session["id"]

    def drive(browser: Any) -> dict[str, Any]:
        alice = open_user(browser, f"{base}/?user=alice&session={sid}")
        bob = open_user(browser, f"{base}/?user=bob&session={sid}")
        wait_online(alice, "bob")
        wait_online(bob, "alice")
        by_id(alice, "audio-only").check()  # alice has no camera to offer
        by_id(alice, "call-button").click()
        by_id(bob, "accept-button").click()
        wait_connected(alice)
        wait_connected(bob)
        alice_in = wait_media_flowing(alice, ("audio", "video"))  # alice still sees bob
        bob_in = wait_media_flowing(bob, ("audio",))  # bob hears alice
        time.sleep(0.5)
        assert inbound(bob)["video"] == 0
        assert alice.evaluate("() => document.getElementById('remote-video').videoWidth") > 0
        close_all(alice, bob)
        return {"alice": alice_in, "bob": bob_in}

    await in_browser(chromium, drive)


async def test_client_reconnects_rejoins_and_resumes_chat_without_duplicates(chromium, server):
    session = await server.create_session("alice", "bob")
    await server.start_session(session["id"])
    base, sid = server.base_url, session["id"]
    # Record what parley.js receives (raw frames) and what it passes on (events); hold back
    # alice's receipts (delivered, and read, which implies it) so the server must re-send message 1 after the reconnect.
    spy = """() => {
        const c = window.parleyDemo.client;
        window.raw = []; window.events = [];
        const onFrame = c._onFrame.bind(c);
        c._onFrame = (f) => { if (f.type === 'chat.message') window.raw.push(f.seq); onFrame(f); };
        c.on('chat.message', (f) => window.events.push(f.seq));
        c.options.receiptDelay = 1e9;
        c.markRead = async () => null;  // a read mark raises delivered too
    }"""

    def drive(browser: Any) -> dict[str, Any]:
        alice = open_user(browser, f"{base}/?user=alice&session={sid}")
        bob = open_user(browser, f"{base}/?user=bob&session={sid}")
        wait_online(alice, "bob")
        alice.evaluate(spy)
        by_id(bob, "chat-input").fill("one")
        by_id(bob, "chat-send").click()
        alice.locator('[data-testid="chat-list"] li[data-seq="1"]').wait_for()

        alice.evaluate("() => window.parleyDemo.client._ws.close()")  # the network drops
        alice.locator('[data-testid="connection-state"][data-state="reconnecting"]').wait_for()
        alice.locator('[data-testid="connection-state"][data-state="open"]').wait_for()
        wait_online(bob, "alice")  # re-joined by itself
        by_id(bob, "chat-input").fill("two")
        by_id(bob, "chat-send").click()
        alice.locator('[data-testid="chat-list"] li[data-seq="2"]').wait_for()
        alice.wait_for_function("() => window.raw.filter((s) => s === 2).length === 1")
        result = {
            "raw": alice.evaluate("() => window.raw"),
            "events": alice.evaluate("() => window.events"),
            "shown": alice.locator('[data-testid="chat-list"] li[data-seq]').count(),
        }
        close_all(alice, bob)
        return result

    result = await in_browser(chromium, drive)
    assert result["raw"] == [1, 1, 2], result  # the server re-sent 1: it was never acknowledged
    assert result["events"] == [1, 2], result  # parley.js dropped the repeat by seq
    assert result["shown"] == 2
