"""Tenants: Redis-direct clients isolated by construction. Every abuse a client's Redis user could do
with the old shared-key ACL is tried as a tenant against a real redis-server with real ACL users, and
the stack (real router, discriminator and workers) is shown to answer everyone else regardless.

Longer than 500 lines on purpose: every abuse shares the module's ACL-backed redis-server and stack
fixtures, which are what a split would start twice."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from common.client import Client
from common.config import Keys, RedisSettings
from common.localstack import LocalStack, RedisServer, StackSpec
from common.messages import DeadLetter, FinalResult
from common.streams import connect
from common.tenants import acl_rules, add, remove, tenant_names

KEYS = Keys()
ADMIN_PASSWORD = "admin-secret"
SERVICE_ACL = ["on", ">svc-secret", "~diffserve:*", "&diffserve:*", "+@all", "-@dangerous"]
MAX_ID = "18446744073709551615-18446744073709551615"
NOPERM = redis.exceptions.NoPermissionError


def _admin_settings(server: RedisServer) -> RedisSettings:
    return RedisSettings(redis_url=f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{server.port}/0")


def add_tenant(server: RedisServer, name: str) -> str:
    async def go():
        r = connect(_admin_settings(server))
        try:
            return await add(r, KEYS, name)
        finally:
            await r.aclose()

    return asyncio.run(go())


def as_user(server: RedisServer, user: str, password: str) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, username=user, password=password, socket_timeout=5)


def tenant_settings(server: RedisServer, password: str) -> RedisSettings:
    return RedisSettings(redis_url=f"redis://127.0.0.1:{server.port}/0", redis_password=password)


@pytest.fixture
def admin_server():
    server = RedisServer(password=ADMIN_PASSWORD).start()
    try:
        yield server
    finally:
        server.stop()


def test_a_tenant_can_touch_nothing_but_its_own_stream_and_replies(admin_server):
    server = admin_server
    alice_pw, bob_pw = add_tenant(server, "alice"), add_tenant(server, "bob")
    admin = redis.Redis(host="127.0.0.1", port=server.port, password=ADMIN_PASSWORD)
    admin.xadd(KEYS.jobs, {"job_id": "shared-1", "prompt": "p"})
    admin.xadd(f"{KEYS.tenant_out('bob')}r1", {"m": b"bob's answer"})
    admin.rpush(KEYS.result("shared-1"), b"someone's answer")
    alice = as_user(server, "alice", alice_pw)

    refused = {
        # the shared jobs stream: delete, trim, empty it, block it
        "DEL jobs": lambda: alice.delete(KEYS.jobs),
        "XTRIM jobs": lambda: alice.xtrim(KEYS.jobs, maxlen=0),
        "XADD jobs MAXLEN 0": lambda: alice.xadd(KEYS.jobs, {"a": "b"}, maxlen=0),
        "XADD jobs at the max id": lambda: alice.xadd(KEYS.jobs, {"a": "b"}, id=MAX_ID),
        # another tenant's stream: the same
        "XADD bob's stream": lambda: alice.xadd(KEYS.tenant_in("bob"), {"job_id": "j", "prompt": "p"}),
        "XADD bob's stream MAXLEN 0": lambda: alice.xadd(KEYS.tenant_in("bob"), {"a": "b"}, maxlen=0),
        "XADD bob's stream at the max id": lambda: alice.xadd(KEYS.tenant_in("bob"), {"a": "b"}, id=MAX_ID),
        "DEL bob's stream": lambda: alice.delete(KEYS.tenant_in("bob")),
        # another tenant's replies: read, delete, forge
        "XREAD bob's replies": lambda: alice.xread({f"{KEYS.tenant_out('bob')}r1": "0"}),
        "DEL bob's replies": lambda: alice.delete(f"{KEYS.tenant_out('bob')}r1"),
        "forge bob's replies": lambda: alice.xadd(f"{KEYS.tenant_out('bob')}r1", {"m": b"forged"}),
        # its own replies: forge, delete, turn into another type
        "forge own replies": lambda: alice.xadd(f"{KEYS.tenant_out('alice')}r1", {"m": b"forged"}),
        "DEL own replies": lambda: alice.delete(f"{KEYS.tenant_out('alice')}r1"),
        "SET own reply key": lambda: alice.set(f"{KEYS.tenant_out('alice')}job:j1", "x"),
        # the shared result lists and reply streams (the old app user's keys)
        "BLPOP a result list": lambda: alice.blpop([KEYS.result("shared-1")], timeout=1),
        "DEL a result list": lambda: alice.delete(KEYS.result("shared-1")),
        "XADD a result key": lambda: alice.xadd(KEYS.result("shared-2"), {"m": b"x"}),
        "XREAD a shared reply stream": lambda: alice.xread({f"{KEYS.reply_prefix}x": "0"}),
        # markers and flags keyed by job id: nobody else's, not even its own markers
        "squat bob's admitted marker": lambda: alice.set(KEYS.admitted("bob/j1"), "1"),
        "squat its own done marker": lambda: alice.set(KEYS.done("alice/j1"), "1"),
        "cancel bob's job": lambda: alice.set(KEYS.cancel("bob/j1"), "1"),
        "cancel a shared job": lambda: alice.set(KEYS.cancel("j1"), "1"),
        "set its own cancel flag (a flag without a TTL would stay forever)": lambda: alice.set(
            KEYS.cancel("alice/j1"), "1"
        ),
        "XREAD its own submissions": lambda: alice.xread({KEYS.tenant_in("alice"): "0"}),
        "the plan": lambda: alice.get(KEYS.plan),
        "the light queue": lambda: alice.xadd(KEYS.light_queue, {"m": b"x"}),
        "EVAL": lambda: alice.eval("return 1", 0),
        "FCALL": lambda: alice.fcall("f", 0),
        "PUBLISH": lambda: alice.publish(f"{KEYS.plan}-announce", "x"),
        "ACL": lambda: alice.acl_list(),
    }
    for what, attempt in refused.items():
        with pytest.raises(NOPERM):
            attempt()
            pytest.fail(f"{what} was allowed")

    # What it may do: submit to its own stream (jobs, and cancel requests), read its own replies.
    assert alice.xadd(KEYS.tenant_in("alice"), {"job_id": "j1", "prompt": "p"})
    assert alice.xadd(KEYS.tenant_in("alice"), {"type": "cancel", "job_id": "j1"})
    assert alice.xread({f"{KEYS.tenant_out('alice')}r1": "0"}) == []
    assert alice.ping()
    # Nothing the refused attempts touched changed.
    assert admin.xlen(KEYS.jobs) == 1 and admin.llen(KEYS.result("shared-1")) == 1
    assert admin.xlen(f"{KEYS.tenant_out('bob')}r1") == 1 and not admin.exists(KEYS.result("shared-2"))
    # The ACL is exactly the documented one.
    bob = admin.acl_getuser("bob")
    assert bob["categories"] == ["-@all"] and bob["channels"] == [] and bob["selectors"] == []
    assert sorted(bob["commands"]) == ["+client|setname", "+ping", "+xadd", "+xread"]
    assert sorted(bob["keys"]) == ["%R~diffserve:out:bob:*", "%W~diffserve:in:bob"]
    assert bob_pw not in str(bob)  # stored hashed


def test_tenant_add_and_remove(admin_server):
    server = admin_server
    admin = redis.Redis(host="127.0.0.1", port=server.port, password=ADMIN_PASSWORD)

    async def go():
        r = connect(_admin_settings(server))
        try:
            with pytest.raises(ValueError, match="not a tenant"):
                await add(r, KEYS, "default")  # would lock the admin out
            with pytest.raises(ValueError, match="a-z"):
                await add(r, KEYS, "Bad/Name")
            first = await add(r, KEYS, "carol", "given-password")
            assert first == "given-password"
            assert await tenant_names(r, KEYS) == {"carol"}
            second = await add(r, KEYS, "carol")  # re-adding rotates the password
            with pytest.raises(redis.exceptions.AuthenticationError):
                as_user(server, "carol", first).ping()
            assert as_user(server, "carol", second).ping()
            await r.sadd(KEYS.tenants, "Not*Valid")  # typed by hand: ignored
            assert await tenant_names(r, KEYS) == {"carol"}
            await remove(r, KEYS, "carol")
            with pytest.raises(ValueError, match="no tenant"):
                await remove(r, KEYS, "default")
            return second
        finally:
            await r.aclose()

    password = asyncio.run(go())
    with pytest.raises(redis.exceptions.AuthenticationError):
        as_user(server, "carol", password).ping()
    assert not admin.exists(KEYS.tenant_in("carol")) and admin.get("default") is None
    assert acl_rules(KEYS, "x", "pw")[0] == "reset"  # add replaces every earlier rule


# ---------- against a running stack ----------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One stack for the module (each test uses its own tenants): services as a limited ACL user."""
    server = RedisServer(password=ADMIN_PASSWORD).start()
    try:
        assert server.cli("ACL", "SETUSER", "diffserve", *SERVICE_ACL) == "OK"
        spec = StackSpec(
            redis_url=f"redis://127.0.0.1:{server.port}/0",
            light_workers=1,
            heavy_workers=1,
            time_scale=0.01,
            # Escalated jobs run on heavy however late: on a busy machine the 50-ms SLO would degrade them
            # all, and the tests here are about who gets which answer, not about deadlines.
            env={"REDIS_USERNAME": "diffserve", "REDIS_PASSWORD": "svc-secret", "DIFFSERVE_LATE_POLICY": "heavy"},
        )
        with LocalStack(spec, str(tmp_path_factory.mktemp("logs"))):
            yield server
    finally:
        server.stop()


def _admin(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, password=ADMIN_PASSWORD)


async def _submit_all(client: Client, job_ids: list[str], **kwargs) -> list[FinalResult]:
    return list(
        await asyncio.gather(*(client.submit(f"a lighthouse {i}", job_id=i, timeout=60, **kwargs) for i in job_ids))
    )


@pytest.mark.slow
def test_two_tenants_with_the_same_job_ids_each_get_exactly_their_answers(stack):
    server = stack
    passwords = {name: add_tenant(server, name) for name in ("happy-a", "happy-b")}
    n = 20
    ids = [f"job-{i}" for i in range(n)]
    shared = RedisSettings(redis_url=f"redis://127.0.0.1:{server.port}/0", redis_username="diffserve")
    shared.redis_password = "svc-secret"

    async def go():
        clients = {name: Client(tenant_settings(server, pw), tenant=name) for name, pw in passwords.items()}
        clients["shared"] = Client(shared)  # a trusted app on the shared stream, same ids too
        lights: dict[str, list[str]] = {name: [] for name in clients}
        try:
            results = await asyncio.gather(
                *(
                    _submit_all(c, ids, on_light=lambda light, name=name: lights[name].append(light.job_id))
                    for name, c in clients.items()
                )
            )
            await asyncio.sleep(0.5)  # a second answer, if there were one, would be on the streams by now
            admin = _admin(server)  # a tenant may not even XLEN its own reply stream
            lengths = {name: admin.xlen(c.reply_stream) for name, c in clients.items() if name != "shared"}
            return (
                dict(zip(clients, results, strict=False)),
                lights,
                lengths,
                {name: c.rejected for name, c in clients.items()},
            )
        finally:
            for c in clients.values():
                await c.close()

    results, lights, lengths, rejected = asyncio.run(go())
    for name, got in results.items():
        assert sorted(r.job_id for r in got) == sorted(ids), name
        assert all(r.status == "ok" for r in got), [(r.job_id, r.error_code) for r in got if r.status != "ok"]
        # The light previews carry the client's own ids: every heavy answer had one (a job sent on to
        # heavy that ran late is answered with its light image, degraded, after its preview).
        heavy = {r.job_id for r in got if r.answered_by == "heavy"}
        degraded = {r.job_id for r in got if r.degraded}
        assert heavy <= set(lights[name]) <= heavy | degraded, name
    assert rejected == {"happy-a": 0, "happy-b": 0, "shared": 0}
    assert lengths == {name: n + len(lights[name]) for name in lengths}  # n answers (and the previews), no more
    assert any(lights.values()), "no job went to the heavy model: the preview path was not exercised"


@pytest.mark.slow
def test_a_tenant_cannot_squat_another_tenants_job_ids_or_reply_keys(stack):
    server = stack
    mallory_pw, victim_pw = add_tenant(server, "mallory"), add_tenant(server, "victim")
    admin = _admin(server)

    async def go():
        async with (
            Client(tenant_settings(server, mallory_pw), tenant="mallory") as mallory,
            Client(tenant_settings(server, victim_pw), tenant="victim") as victim,
        ):
            # mallory uses the ids first (admitted and answered) ...
            squatted = await _submit_all(mallory, ["order-1", "order-2"])
            # ... names the victim's keys as its reply streams, and an id with the scoping separator
            stolen = await mallory.enqueue("p", job_id="order-3", reply_to=f"{KEYS.tenant_out('victim')}stolen")
            shared_key = await mallory.enqueue("p", job_id="order-4", reply_to=f"{KEYS.reply_prefix}x")
            scoped = await mallory.enqueue("p", job_id="victim/order-5", reply=False)
            refusals = [await mallory.wait_result(i, timeout=30) for i in (stolen, shared_key)]
            # ... and cancels the ids in its own scope
            await mallory.cancel("order-5")
            victims = await _submit_all(victim, ["order-1", "order-2", "order-3", "order-5"])
            return squatted, refusals, victims, scoped

    squatted, refusals, victims, scoped = asyncio.run(go())
    assert [r.status for r in squatted] == ["ok", "ok"]
    assert [(r.job_id, r.error_code) for r in refusals] == [
        ("order-3", "invalid_request"),
        ("order-4", "invalid_request"),
    ]
    assert [(r.job_id, r.status) for r in victims] == [(f"order-{i}", "ok") for i in (1, 2, 3, 5)]
    assert not admin.exists(f"{KEYS.tenant_out('victim')}stolen")
    # the id with the separator names no key: a dead letter from mallory's stream, answered nowhere
    dead = [DeadLetter.decode(fields[b"m"]) for _id, fields in admin.xrange(KEYS.dead_letters)]
    assert [(d.stream, d.error_code) for d in dead if scoped.encode() in d.raw] == [
        (KEYS.tenant_in("mallory"), "invalid_request")
    ]


@pytest.mark.slow
def test_a_tenant_cancels_only_its_own_jobs(stack):
    server = stack
    pw = add_tenant(server, "canceller")

    async def go():
        async with Client(tenant_settings(server, pw), tenant="canceller") as c:
            await c.cancel("c1")  # before it is submitted: answered 'cancelled', never run
            return await _submit_all(c, ["c1", "c2"])

    results = asyncio.run(go())
    assert [(r.job_id, r.status) for r in results] == [("c1", "cancelled"), ("c2", "ok")]


@pytest.mark.slow
def test_a_wrong_typed_result_key_does_not_swallow_the_answer(stack):
    """Whoever can write a result list or reply stream's name (a trusted app on the shared stream)
    makes it another type; before the TYPE check the router set the done marker, the write failed,
    and the job counted as answered with nobody answered."""
    admin = _admin(stack)
    admin.set(KEYS.result("typed-1"), "not a list")
    admin.xadd(KEYS.result("typed-2"), {"m": b"a stream, not a list"})
    admin.set(f"{KEYS.reply_prefix}typed", "not a stream")
    admin.xadd(KEYS.jobs, {"job_id": "typed-1", "prompt": "a harbour"})
    admin.xadd(KEYS.jobs, {"job_id": "typed-2", "prompt": "a harbour"})
    admin.xadd(KEYS.jobs, {"job_id": "typed-3", "prompt": "a harbour", "reply_to": f"{KEYS.reply_prefix}typed"})

    def answered(key: str, kind: bytes) -> None:  # the key turns into the right type with the answer in it
        deadline = time.monotonic() + 30
        while admin.type(key) != kind and time.monotonic() < deadline:
            time.sleep(0.05)
        assert admin.type(key) == kind, key

    for job_id in ("typed-1", "typed-2"):
        answered(KEYS.result(job_id), b"list")
        result = FinalResult.decode(admin.lpop(KEYS.result(job_id)))
        assert (result.job_id, result.status) == (job_id, "ok")
    answered(f"{KEYS.reply_prefix}typed", b"stream")
    [(_id, fields)] = admin.xrange(f"{KEYS.reply_prefix}typed")
    assert FinalResult.decode(fields[b"m"]).job_id == "typed-3"


@pytest.mark.slow
def test_a_tenant_that_empties_or_blocks_its_own_stream_harms_only_itself(stack):
    server = stack
    vandal_pw, other_pw = add_tenant(server, "vandal"), add_tenant(server, "bystander")
    vandal = as_user(server, "vandal", vandal_pw)
    n = 20

    async def go():
        async with (
            Client(tenant_settings(server, vandal_pw), tenant="vandal") as mine,
            Client(tenant_settings(server, other_pw), tenant="bystander") as other,
        ):
            pending = asyncio.gather(*(other.submit(f"a fox {i}", timeout=60) for i in range(n)))
            for i in range(50):
                await mine.enqueue(f"p{i}", job_id=f"v{i}")
            vandal.xadd(KEYS.tenant_in("vandal"), {"a": "b"}, maxlen=0)  # its own queued jobs vanish
            vandal.xadd(KEYS.tenant_in("vandal"), {"a": "b"}, id=MAX_ID)  # no more submissions
            with pytest.raises(redis.exceptions.ResponseError, match="exhausted"):
                await mine.enqueue("p", job_id="after")
            return await pending

    started = time.monotonic()
    results = asyncio.run(go())
    assert sorted(r.status for r in results) == ["ok"] * n
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_a_removed_tenant_is_no_longer_served_and_its_keys_are_gone(stack):
    server = stack
    pw = add_tenant(server, "leaver")
    admin = _admin(server)

    async def go():
        async with Client(tenant_settings(server, pw), tenant="leaver") as c:
            first = await c.submit("a fox", job_id="l1", timeout=60)
            r = connect(_admin_settings(server))
            try:
                await remove(r, KEYS, "leaver")
            finally:
                await r.aclose()
            return first

    assert asyncio.run(go()).status == "ok"
    with pytest.raises(redis.exceptions.AuthenticationError):
        as_user(server, "leaver", pw).ping()
    time.sleep(4)  # two looks at the tenant set: the router has stopped the tenant's loop
    assert admin.keys(f"{KEYS.tenant_in('leaver')}*") == [] and admin.keys(f"{KEYS.tenant_out('leaver')}*") == []


def test_the_controller_counts_tenant_submissions_as_demand(redis_server):
    """Demand is every submission stream's arrivals; a removed tenant's stream is not subtracted."""
    from common.service import Service
    from services.controller import Controller, ControllerConfig

    async def go():
        svc = Service("controller", ControllerConfig(redis_url=redis_server.url))
        controller = Controller(svc)
        r = svc.redis
        try:
            await r.xadd(KEYS.jobs, {"job_id": "a", "prompt": "p"})
            seen = [await controller.arrivals()]  # the first look is the baseline
            controller.ticks = 1
            await r.sadd(KEYS.tenants, "t1")
            for i in range(3):
                await r.xadd(KEYS.tenant_in("t1"), {"job_id": f"t{i}", "prompt": "p"})
            await r.xadd(KEYS.jobs, {"job_id": "b", "prompt": "p"})
            seen.append(await controller.arrivals())  # a new tenant's 3 and the shared stream's 1
            await r.xadd(KEYS.tenant_in("t1"), {"job_id": "t9", "prompt": "p"})
            seen.append(await controller.arrivals())
            await r.srem(KEYS.tenants, "t1")
            seen.append(await controller.arrivals())  # gone, not subtracted
            return seen
        finally:
            await r.aclose()

    assert asyncio.run(go()) == [0, 4, 5, 5]


@pytest.mark.slow
def test_the_tenant_commands_and_submit_as_a_tenant(stack, tmp_path):
    import os
    import subprocess
    import sys

    admin_env = {**os.environ, "REDIS_URL": f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{stack.port}/0"}

    def diffserve(*args: str, env: dict) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "diffserve", *args], env=env, capture_output=True, text=True, timeout=60
        )

    added = diffserve("tenant", "add", "cli-t", env=admin_env)
    assert added.returncode == 0, added.stderr
    assert "ACL SAVE failed" in added.stderr  # this Redis has no aclfile: the operator is told
    fields = dict(part.split("=", 1) for part in added.stdout.split() if "=" in part)
    assert fields["REDIS_USERNAME"] == "cli-t" and fields["DIFFSERVE_TENANT"] == "cli-t"
    assert diffserve("tenant", "list", env=admin_env).stdout.split() == sorted(
        n.decode() for n in _admin(stack).smembers(KEYS.tenants)
    )
    tenant_env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{stack.port}/0",
        "REDIS_PASSWORD": fields["REDIS_PASSWORD"],
        "DIFFSERVE_TENANT": "cli-t",
    }
    out = tmp_path / "fox.png"
    submitted = diffserve("submit", "a fox", "-o", str(out), env=tenant_env)
    assert submitted.returncode == 0, submitted.stderr
    assert out.read_bytes()
    refused = diffserve("tenant", "add", "default", env=admin_env)
    assert refused.returncode != 0 and "not a tenant" in refused.stderr and "Traceback" not in refused.stderr
    assert diffserve("tenant", "remove", "cli-t", env=admin_env).returncode == 0
    assert "cli-t" not in diffserve("tenant", "list", env=admin_env).stdout.split()


def test_a_tenants_job_may_only_name_its_own_reply_keys():
    from common.messages import E_INVALID, MessageError
    from common.streams import Entry
    from services.router import RouterConfig, parse_job

    cfg = RouterConfig()

    def entry(**fields: str) -> Entry:
        return Entry("1-0", None, {k.encode(): v.encode() for k, v in {"prompt": "p", **fields}.items()})

    assert parse_job(entry(job_id="j1"), cfg, KEYS, "alice").reply_to == "diffserve:out:alice:job:j1"
    assert parse_job(entry(job_id="j1", reply_to="diffserve:out:alice:r"), cfg, KEYS, "alice").reply_to.endswith(":r")
    assert parse_job(entry(job_id="j1"), cfg, KEYS).reply_to is None  # the shared stream: the result list
    for foreign in ("diffserve:out:bob:r", "diffserve:out:alice-2:r", "diffserve:reply:r", "diffserve:result:j1"):
        with pytest.raises(MessageError) as refused:
            parse_job(entry(job_id="j1", reply_to=foreign), cfg, KEYS, "alice")
        assert (refused.value.code, refused.value.job_id) == (E_INVALID, "j1")
    with pytest.raises(MessageError):  # nor may a shared-stream job name a tenant's key
        parse_job(entry(job_id="j1", reply_to="diffserve:out:alice:r"), cfg, KEYS)


@pytest.mark.slow
def test_a_tenants_cancel_flags_expire(stack):
    """A tenant cancels through its own stream; the router sets the flag, always with a TTL (a tenant
    could SET its flags without one, and they stayed in Redis for good)."""
    server = stack
    pw = add_tenant(server, "flagger")
    admin = _admin(server)

    async def go():
        async with Client(tenant_settings(server, pw), tenant="flagger") as c:
            await c.cancel("later-1")  # not submitted yet
            done = await c.submit("a fox", job_id="f1", timeout=60)
            await c.cancel("f1")  # already answered
            await asyncio.sleep(1.0)
            return done

    assert asyncio.run(go()).status == "ok"
    flags = admin.keys(f"{KEYS.cancel_prefix}flagger*")
    assert len(flags) == 2 and all(0 < admin.ttl(key) <= 3600 for key in flags)


@pytest.mark.slow
def test_a_name_removed_and_added_again_inherits_nothing(stack):
    """The same name, removed and added again, is a new tenant: the old one's cancel flags and admitted
    ids used to cancel or refuse the new one's jobs (duplicate_job_id)."""
    server = stack
    admin = _admin(server)

    async def first_life(pw: str):
        async with Client(tenant_settings(server, pw), tenant="phoenix") as c:
            answered = await c.submit("a fox", job_id="p1", timeout=60)
            await c.cancel("p2")
            await asyncio.sleep(1.0)
        r = connect(_admin_settings(server))
        try:
            await remove(r, KEYS, "phoenix")
        finally:
            await r.aclose()
        return answered

    async def second_life(pw: str):
        await asyncio.sleep(2.5)  # the router sees the new tenant
        async with Client(tenant_settings(server, pw), tenant="phoenix") as c:
            return await _submit_all(c, ["p1", "p2"])

    assert asyncio.run(first_life(add_tenant(server, "phoenix"))).status == "ok"
    leftovers = [k for p in ("cancel", "admitted", "done") for k in admin.keys(f"diffserve:{p}:phoenix*")]
    assert leftovers == []
    results = asyncio.run(second_life(add_tenant(server, "phoenix")))
    assert [(r.job_id, r.status, r.error_code) for r in results] == [("p1", "ok", None), ("p2", "ok", None)]
