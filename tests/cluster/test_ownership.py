"""Ownership against a real Redis and PostgreSQL: two nodes racing to claim one session get
exactly one owner each time, the epoch fences the other, and a node refuses to start
without the cluster's secret (or heartbeat)."""

from __future__ import annotations

import dataclasses
import uuid

import coredis
import pytest
import trio

from actors.clock import WallClock
from actors.cluster.errors import ClusterRefused
from actors.cluster.lease import NodeLease
from actors.cluster.ownership import RedisOwnership, owner_key
from domain.errors import Fenced, StorageUnavailable
from domain.timeline import TAKEN_OVER
from storage import messages as sm
from storage.postgres_backend import PostgresBackend
from tests.conftest import start_server, test_settings
from tests.storage.test_storage import Wrapped, chat, new_session, open_storage

ROUNDS = 40


async def test_two_nodes_racing_to_claim_one_session(redis_server, postgres_url):
    with trio.fail_after(30):
        async with open_storage(PostgresBackend(postgres_url)) as (_, storage):
            sid = uuid.uuid4().hex
            await storage.write(new_session(sid))
            async with coredis.Redis.from_url(redis_server.url) as redis:
                leases = [NodeLease(redis, f"r{i}", ttl=10) for i in (1, 2)]
                for lease in leases:
                    await lease.acquire()
                nodes = [RedisOwnership(redis, lease, storage, WallClock()) for lease in leases]
                last_epoch = 0
                for round_ in range(ROUNDS):
                    # half the rounds start from nobody, half from an owner whose lease expired
                    if round_ % 2:
                        await redis.set(owner_key(sid), "gone-node")
                    else:
                        await redis.delete([owner_key(sid)])
                    for node in nodes:
                        node.claims.clear()
                    results: list[int | str] = ["", ""]

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_claim, nodes[0], sid, results, 0)
                        nursery.start_soon(_claim, nodes[1], sid, results, 1)
                    winners = [i for i, r in enumerate(results) if isinstance(r, int)]
                    assert len(winners) == 1, results
                    [winner] = winners
                    assert results[winner] == last_epoch + 1
                    last_epoch = results[winner]
                    assert (await redis.get(owner_key(sid))).decode() == f"r{winner + 1}"
                    stored = await storage.read(sm.GetSession(session_id=sid))
                    assert stored.owner_node == f"r{winner + 1}"
                    # whoever held an older epoch cannot write any more
                    with pytest.raises(Fenced):
                        await storage.write(dataclasses.replace(chat(sid, f"old{round_}"), epoch=last_epoch - 1))
                    await storage.write(dataclasses.replace(chat(sid, f"new{round_}"), epoch=last_epoch))
                messages = await storage.read(sm.GetMessages(session_id=sid, limit=200))
                assert [m.seq for m in messages] == list(range(1, ROUNDS + 1))


class FailsOnce(Wrapped):
    """Fails the first write of one request type as a database going away would."""

    def __init__(self, inner: PostgresBackend, kind: type) -> None:
        super().__init__(inner)
        self.kind = kind
        self.failed = False

    def write(self, conn: object, request: object) -> object:
        if type(request) is self.kind and not self.failed:
            self.failed = True
            raise StorageUnavailable("storage unavailable: the database went away")
        return self.inner.write(conn, request)


@pytest.mark.parametrize("failing", [sm.ClaimSession, sm.AppendTimeline], ids=["epoch bump", "takeover entry"])
async def test_a_takeover_whose_first_claim_fails_is_still_recorded(redis_server, postgres_url, failing):
    """The sweeper claims a dead node's session in Redis, the session's actor then claims the
    epoch; when that fails once, the retry must still record whom the session was taken from."""
    with trio.fail_after(30):
        async with open_storage(FailsOnce(PostgresBackend(postgres_url), failing)) as (_, storage):
            sid = uuid.uuid4().hex
            await storage.write(new_session(sid))
            async with coredis.Redis.from_url(redis_server.url) as redis:
                lease = NodeLease(redis, "t1", ttl=10)
                await lease.acquire()
                await redis.set(owner_key(sid), "dead-node")  # a node whose lease is gone
                node = RedisOwnership(redis, lease, storage, WallClock())
                assert (await node.claim_in_redis(sid))[0] == "claimed"  # as the sweeper does
                with pytest.raises(StorageUnavailable):
                    await node.claim(sid)
                epoch = await node.claim(sid)
            timeline = await storage.read(sm.GetTimeline(session_id=sid))
    taken = [(e.detail["from"], e.detail["to"], e.detail["epoch"]) for e in timeline if e.kind == TAKEN_OVER]
    assert taken == [("dead-node", "t1", epoch)]


async def test_a_node_refuses_to_start_without_the_clusters_secret(nursery, tmp_path, cluster_env):
    settings = test_settings(
        tmp_path, redis_url=cluster_env["PARLEY_REDIS_URL"], database_url=cluster_env["PARLEY_DATABASE_URL"],
        node_id="a",
    )
    with trio.fail_after(20):
        first = await start_server(nursery, settings)  # the cluster's secret is now this one
        for secret, says in ((None, "needs PARLEY_SECRET"), ("another-secret-of-enough-length-123456", "differs")):
            with pytest.raises(BaseExceptionGroup) as refused:
                await start_server(nursery, dataclasses.replace(settings, node_id=f"b{len(says)}", secret=secret))
            assert says in " ".join(str(e) for e in _leaves(refused.value, ClusterRefused))
        with pytest.raises(BaseExceptionGroup) as differs:  # members on other nodes are judged by it
            await start_server(nursery, dataclasses.replace(settings, node_id="c", heartbeat=5.0))
        assert "--heartbeat 5.0 differs" in " ".join(str(e) for e in _leaves(differs.value, ClusterRefused))
        with pytest.raises(BaseExceptionGroup) as taken:  # a node id a live node holds
            await start_server(nursery, dataclasses.replace(settings, port=0))
        assert "in use by a live node" in " ".join(str(e) for e in _leaves(taken.value, ClusterRefused))
        await first.stop()
        await first.http.aclose()


async def _claim(node: RedisOwnership, session_id: str, results: list[int | str], i: int) -> None:
    try:
        results[i] = await node.claim(session_id)
    except Fenced:
        results[i] = "fenced"


def _leaves(group: BaseExceptionGroup, kind: type[BaseException]) -> list[BaseException]:
    match, _ = group.split(kind)
    found: list[BaseException] = []
    stack: list[BaseException] = [match] if match is not None else []
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            found.append(exc)
    return found


def test_run_py_says_why_a_node_cannot_join(tmp_path, cluster_env):
    import os
    import subprocess
    import sys

    from tests.processes import ROOT

    env = {k: v for k, v in os.environ.items() if k != "PARLEY_SECRET"} | cluster_env
    refused = subprocess.run(
        [sys.executable, "run.py", "--port", "0", "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode == 1, refused.stderr
    assert "cannot start: cluster mode needs PARLEY_SECRET" in refused.stderr
    assert "Traceback" not in refused.stderr
