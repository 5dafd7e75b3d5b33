"""Tenants at scale (issue 24.5-24.8): a thousand tenants on a bounded number of router connections,
one admission point for all of them, fair share under overload, and tenants that try to exhaust Redis's
connections or memory. One real stack (router, discriminator, a light worker) on a real redis-server;
every tenant is a real ACL user writing its own stream."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis

from common.config import Keys, RedisSettings
from common.localstack import LocalStack, RedisServer, StackSpec
from common.messages import ENTRY_FIELD, FinalResult, Job
from common.streams import connect
from common.tenants import add

KEYS = Keys()
TIME_SCALE = 0.25  # light batch of 4: 55 ms; the SLO: 1250 ms


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Every light image is the answer (threshold 0), so capacity is one light worker's."""
    server = RedisServer().start()
    try:
        spec = StackSpec(
            redis_url=server.url,
            light_workers=1,
            heavy_workers=0,
            time_scale=TIME_SCALE,
            env={"DIFFSERVE_THRESHOLD": "0"},
        )
        with LocalStack(spec, str(tmp_path_factory.mktemp("logs"))) as running:
            yield server, running
    finally:
        server.stop()


def register(server: RedisServer, names: list[str]) -> dict[str, str]:
    async def go():
        r = connect(RedisSettings(redis_url=server.url))
        try:
            return {name: await add(r, KEYS, name) for name in names}
        finally:
            await r.aclose()

    passwords = asyncio.run(go())
    time.sleep(2.5)  # the router looks for new tenants every 2 s
    return passwords


def as_tenant(server: RedisServer, name: str, password: str) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, username=name, password=password, socket_timeout=10)


def job(job_id: str, **kwargs) -> dict[bytes, bytes]:
    return {ENTRY_FIELD: Job(job_id=job_id, prompt=f"a lighthouse {job_id}", **kwargs).encode()}


def answers(admin: redis.Redis, wanted: dict[str, list[str]], timeout: float) -> dict[tuple[str, str], FinalResult]:
    """tenant -> job ids: the answer on each default reply stream, as far as they came within ``timeout``."""
    got: dict[tuple[str, str], FinalResult] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(got) < sum(map(len, wanted.values())):
        todo = [(t, j) for t, ids in wanted.items() for j in ids if (t, j) not in got]
        with admin.pipeline(transaction=False) as pipe:
            for tenant, job_id in todo:
                pipe.xrange(f"{KEYS.tenant_out(tenant)}job:{job_id}", count=2)
            for key, entries in zip(todo, pipe.execute(), strict=False):
                if entries:
                    assert len(entries) == 1, key  # exactly one answer
                    got[key] = FinalResult.decode(entries[0][1][ENTRY_FIELD])
        time.sleep(0.2)
    return got


def router_connections(admin: redis.Redis) -> int:
    return sum(1 for c in admin.client_list() if c["name"] == "router:router")


@pytest.mark.slow
def test_a_thousand_tenants_are_all_served_on_a_bounded_number_of_router_connections(stack):
    """With one admit loop per tenant on a pool of 100 connections, tenants past the hundredth were never
    served (and the router needed SIGKILL to stop). One reader serves them all, and SIGTERM stops it."""
    server, running = stack
    admin = redis.Redis.from_url(server.url)
    names = [f"t{i:04d}" for i in range(1000)]
    passwords = register(server, names)
    for name in names:
        tenant = as_tenant(server, name, passwords[name])
        tenant.xadd(KEYS.tenant_in(name), job("j1", slo_ms=600_000))
        tenant.close()
    got = answers(admin, {name: ["j1"] for name in names}, timeout=90)
    connections = router_connections(admin)
    started = time.monotonic()
    running.kill("router", signal.SIGTERM)  # and it stops promptly, 1,000 streams or not
    stopped_s = time.monotonic() - started
    running.restart("router")
    print(f"1000 tenants: {len(got)} answered, router connections {connections}, SIGTERM stop {stopped_s:.1f} s")
    assert len(got) == 1000 and {r.status for r in got.values()} == {"ok"}
    assert connections <= 10
    assert stopped_s < 5


@pytest.mark.slow
def test_fifty_tenants_submitting_at_once_are_not_over_admitted(stack):
    """50 tenants x 4 jobs at the same moment, about 2.5x what one light worker can answer within the SLO.
    With one admit loop per tenant each measured the queue without the others' jobs: all were admitted
    and 42 % finished on time. One admission point admits what fits."""
    server, _running = stack
    admin = redis.Redis.from_url(server.url)
    names = [f"burst{i:02d}" for i in range(50)]
    passwords = register(server, names)
    tenants = {name: as_tenant(server, name, passwords[name]) for name in names}
    pipes = []
    for name, tenant in tenants.items():
        pipe = tenant.pipeline(transaction=False)
        for i in range(4):
            pipe.xadd(KEYS.tenant_in(name), job(f"b{i}"))
        pipes.append(pipe)
    for pipe in pipes:  # as close to the same moment as one process gets
        pipe.execute()
    got = answers(admin, {name: [f"b{i}" for i in range(4)] for name in names}, timeout=30)
    served = [r for r in got.values() if r.status == "ok"]
    refused = [r for r in got.values() if r.error_code == "overloaded"]
    on_time = sum(bool(r.slo_met) for r in served)
    print(f"50x4 at once: admitted {len(served)}, refused {len(refused)}, on time {on_time}")
    assert len(got) == 200 and len(served) + len(refused) == 200
    assert 20 <= len(served) <= 150
    assert on_time >= 0.95 * len(served)


@pytest.mark.slow
def test_a_quiet_tenant_is_not_refused_while_another_floods(stack):
    """One tenant offers 3x capacity, another about 10 %. Without fair share both were refused alike
    (the quiet one 56 % of the time in the issue's run); now the flood is refused and the quiet one is
    admitted, on time."""
    server, _running = stack
    admin = redis.Redis.from_url(server.url)
    passwords = register(server, ["flood", "quiet"])
    flood, quiet = as_tenant(server, "flood", passwords["flood"]), as_tenant(server, "quiet", passwords["quiet"])
    capacity = 4 / (0.220 * TIME_SCALE)  # jobs/s of one light worker at batch 4
    tick, seconds = 0.05, 8.0
    sent = {"flood": [], "quiet": []}
    start, quiet_due = time.monotonic(), 0.0
    while (now := time.monotonic() - start) < seconds:
        with flood.pipeline(transaction=False) as pipe:
            for _ in range(round(3 * capacity * tick)):
                job_id = f"f{len(sent['flood'])}"
                sent["flood"].append(job_id)
                pipe.xadd(KEYS.tenant_in("flood"), job(job_id))
            pipe.execute()
        if now >= quiet_due:
            job_id = f"q{len(sent['quiet'])}"
            sent["quiet"].append(job_id)
            quiet.xadd(KEYS.tenant_in("quiet"), job(job_id))
            quiet_due += 1 / (0.1 * capacity)
        time.sleep(max(0.0, start + now + tick - time.monotonic()))
    got = answers(admin, sent, timeout=30)

    def refused_share(tenant: str) -> float:
        mine = [r for (t, _j), r in got.items() if t == tenant]
        return sum(r.error_code == "overloaded" for r in mine) / len(mine)

    quiet_ok = [r for (t, _j), r in got.items() if t == "quiet" and r.status == "ok"]
    print(
        f"flood {len(sent['flood'])} sent, {refused_share('flood'):.0%} refused; quiet {len(sent['quiet'])} sent, "
        f"{refused_share('quiet'):.0%} refused, {sum(bool(r.slo_met) for r in quiet_ok)} of {len(quiet_ok)} on time"
    )
    assert len(got) == len(sent["flood"]) + len(sent["quiet"])
    assert refused_share("flood") > 0.5
    assert refused_share("quiet") <= 0.05
    assert all(r.slo_met for r in quiet_ok)


def _resp(*parts: str) -> bytes:
    return f"*{len(parts)}\r\n".encode() + b"".join(f"${len(p)}\r\n{p}\r\n".encode() for p in parts)


@pytest.mark.slow
def test_one_tenant_holding_every_connection_does_not_lock_services_out(stack):
    """Redis has no per-user connection limit: a tenant that opens connections until Redis refuses more
    locked every new client out, services included. The router closes a tenant's connections beyond
    --tenant-max-connections (32), so a new service connection gets in again within seconds."""
    import socket

    server, _running = stack
    admin = redis.Redis.from_url(server.url)
    (password,) = register(server, ["hog"]).values()
    admin.config_set("maxclients", 120)
    held: list[socket.socket] = []
    try:
        for _ in range(150):  # a burst, faster than any periodic check
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(_resp("AUTH", "hog", password))
            held.append(sock)
        replies = [sock.recv(128) for sock in held]
        refused = sum(reply.startswith(b"-ERR max number of clients") for reply in replies)
        start, joined = time.monotonic(), None
        while joined is None and time.monotonic() < start + 10:
            try:
                redis.Redis.from_url(server.url, socket_timeout=2).ping()
                joined = time.monotonic() - start
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        still = sum(1 for c in admin.client_list() if c["user"] == "hog")
    finally:
        admin.config_set("maxclients", 10000)
        for sock in held:
            sock.close()
    print(
        f"hog: {len(replies) - refused} connections, {refused} refused; a new client got in after {joined} s, "
        f"the hog kept {still}"
    )
    assert refused > 0  # Redis was full
    assert joined is not None and joined < 5
    assert still <= 32


@pytest.mark.slow
def test_a_tenant_filling_its_own_stream_cannot_fill_redis_for_everyone(stack):
    """Redis at its maxmemory because one tenant queued 100 MB in its own stream: every write failed
    (OOM), so no one was served until the tenant was removed. The router cuts a tenant's stream to
    --tenant-max-queued entries (1000), which frees the memory, and the others are served."""
    server, _running = stack
    admin = redis.Redis.from_url(server.url)
    passwords = register(server, ["filler", "bystander"])
    filler = as_tenant(server, "filler", passwords["filler"])
    admin.config_set("maxmemory", 64 << 20)
    try:
        pad = b"x" * 32_000
        refused = 0
        for batch in range(40):
            with filler.pipeline(transaction=False) as pipe:
                for i in range(100):
                    pipe.xadd(KEYS.tenant_in("filler"), {"job_id": f"fill-{batch}-{i}", "prompt": "p", "pad": pad})
                replies = pipe.execute(raise_on_error=False)
            refused += sum(isinstance(reply, redis.exceptions.ResponseError) for reply in replies)
        # the router cuts the stream once its tenant watcher has seen the new tenant (a round or two)
        deadline = time.monotonic() + 15
        while admin.xlen(KEYS.tenant_in("filler")) > 1000 and time.monotonic() < deadline:
            time.sleep(0.1)
        bystander = as_tenant(server, "bystander", passwords["bystander"])
        bystander.xadd(KEYS.tenant_in("bystander"), job("by-1", slo_ms=60_000))
        got = answers(admin, {"bystander": ["by-1"]}, timeout=15)
        queued = admin.xlen(KEYS.tenant_in("filler"))
    finally:
        admin.config_set("maxmemory", 0)
    print(f"filler: {refused} of 4000 submissions refused by Redis (OOM), {queued} left queued")
    assert got and got["bystander", "by-1"].status == "ok"
    assert queued <= 1000
