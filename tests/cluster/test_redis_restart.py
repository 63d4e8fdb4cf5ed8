"""Redis restarts under chat load (it keeps nothing: `--save ''`): delivery stalls, /readyz says
so, then everything recovers; nothing acknowledged is lost and nothing is billed twice."""

from __future__ import annotations

import trio

from tests.cluster.conftest import start_redis
from tests.cluster.test_takeover import collect, send_until_acked


async def test_redis_restart_under_load(make_node, redis_server):
    with trio.fail_after(40):
        n1 = await make_node("n1", billing_tick=0.5)
        n2 = await make_node("n2", billing_tick=0.5)
        session = await n1.create_session()
        sid = session["id"]
        await n1.start_session(sid)
        acked: dict[str, int] = {}
        received: list[int] = []
        async with n1.client("alice") as alice, n2.client("bob") as bob:
            await alice.request("join", session=sid)
            await bob.request("join", session=sid)
            both_joined = trio.current_time()
            stop = trio.Event()
            async with trio.open_nursery() as inner:
                inner.start_soon(collect, bob, received, stop)
                for i in range(10):
                    acked[f"a{i}"] = (await send_until_acked(alice, sid, f"a{i}", f"m{i}"))["seq"]
                redis_server.stop()
                await trio.sleep(1.5)  # past the lease: this node refuses session writes, and says so
                assert (await n1.http.get("/readyz")).status_code == 503
                restarted = start_redis(redis_server.port)
                try:
                    for i in range(10, 30):
                        acked[f"a{i}"] = (await send_until_acked(alice, sid, f"a{i}", f"m{i}"))["seq"]
                    with trio.fail_after(10):
                        while (await n1.http.get("/readyz")).status_code != 200:
                            await trio.sleep(0.1)
                    with trio.fail_after(10):
                        while len(set(received)) < len(acked):
                            await trio.sleep(0.1)
                    stop.set()
                    ended = await n2.http.post(f"/api/sessions/{sid}/end", headers=n2.auth("alice"))
                    both_present = trio.current_time() - both_joined
                    assert ended.status_code == 200, ended.text
                finally:
                    redis_server.process = restarted.process  # the fixture stops this one
        history = (await n1.http.get(f"/api/sessions/{sid}/messages", params={"limit": 200},
                                     headers=n1.auth("alice"))).json()["items"]
        assert [m["seq"] for m in history] == list(range(1, 31))
        assert {m["client_id"]: m["seq"] for m in history} == acked
        assert received == sorted(set(received)) == list(range(1, 31))
        bill = (await n1.http.get(f"/api/sessions/{sid}/billing", headers=n1.auth("alice"))).json()
        assert bill["final"] is True and bill["billable_ms"] <= both_present * 1000
        timeline = (await n1.http.get(f"/api/sessions/{sid}/timeline", headers=n1.auth("alice"))).json()["items"]
        assert [e["kind"] for e in timeline].count("billing_finalized") == 1
