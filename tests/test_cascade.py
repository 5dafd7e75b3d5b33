"""The cascade end to end: real processes, a real redis-server, the client."""

from __future__ import annotations

import asyncio
import io
import re
import time
import urllib.request

import msgpack
import openai
import pytest
import redis
from PIL import Image

from common.client import Client
from common.config import Keys
from common.localstack import LocalStack, StackSpec, free_port
from common.messages import DeadLetter, FinalResult
from common.planner import default_plan
from common.profiles import load_cascade_profile, load_prompts

KEYS = Keys()


def _stack(redis_server, tmp_path, **kwargs) -> LocalStack:
    spec = StackSpec(redis_url=redis_server.url, **kwargs)
    return LocalStack(spec, str(tmp_path / "logs"))


async def _submit_and_count(redis_url: str, prompts: list[str], rate: float):
    """Submit everything through one client; return the results and how many entries
    reached the client's reply stream (must equal the number of jobs: exactly once)."""
    async with Client(redis_url=redis_url) as client:

        async def one(i, p):
            await asyncio.sleep(i / rate)
            return await client.submit(p, timeout=120)

        results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        await asyncio.sleep(0.5)  # any duplicate would land by now
        delivered = await client.redis.xlen(client.reply_stream)
        return results, delivered


@pytest.mark.slow
def test_200_prompts_come_back_exactly_once_through_both_models(redis_server, tmp_path):
    prompts = load_prompts()[:200]
    with _stack(
        redis_server, tmp_path, light_workers=2, heavy_workers=2, time_scale=0.02, env={"DIFFSERVE_SLO_MS": "100"}
    ):
        # 200 q/s: at time scale 0.02 each service's per-batch CPU is most of a batch's time, and a faster
        # pace on a busy 2-core machine gets jobs refused by admission (correctly), which is not this test
        results, delivered = asyncio.run(_submit_and_count(redis_server.url, prompts, rate=200))
    assert delivered == 200
    assert len({r.job_id for r in results}) == 200
    assert all(r.status == "ok" for r in results), [r.error_message for r in results if r.status != "ok"][:3]
    answered = {r.answered_by for r in results}
    # no controller: the services' default plan, the cascade's threshold for low demand (0.21), splits them
    t = default_plan(load_cascade_profile("sdturbo-sdv15")).threshold
    assert answered == {"light", "heavy"} and t == 0.21
    heavy = [r for r in results if r.answered_by == "heavy"]
    light = [r for r in results if r.answered_by == "light"]
    # Confident light images are answers; the rest went to the heavy model, unless the heavy
    # queue could not make their deadline: then the light image is the answer, marked degraded.
    assert all(r.confidence >= t and r.light_reason == "confident" for r in light if not r.degraded)
    assert all(r.confidence < t for r in heavy) and all(r.confidence < t for r in light if r.degraded)
    assert all(r.light_reason == "deadline" for r in light if r.degraded)
    assert all(r.image[:8] == b"\x89PNG\r\n\x1a\n" for r in results)
    assert {r.model for r in heavy} == {"sdv15"} and {r.model for r in light} == {"sdturbo"}


def _xadd(r: redis.Redis, fields: dict) -> None:
    r.xadd(KEYS.jobs, fields)


def _result(r: redis.Redis, job_id: str, timeout: float = 20) -> FinalResult:
    reply = r.blpop([KEYS.result(job_id)], timeout=timeout)
    assert reply is not None, f"no result for {job_id}"
    return FinalResult.decode(reply[1])


@pytest.mark.slow
def test_malformed_inputs_get_error_results_and_services_keep_running(redis_server, tmp_path):
    r = redis.Redis.from_url(redis_server.url)
    metrics_port = free_port()
    with _stack(
        redis_server, tmp_path, light_workers=1, heavy_workers=1, time_scale=0.01, metrics_base_port=metrics_port
    ) as stack:
        pack = lambda body: {"m": msgpack.packb(body)}  # noqa: E731
        cases = {
            "empty": pack({"type": "job", "job_id": "empty", "prompt": "   "}),
            "missing": pack({"type": "job", "job_id": "missing"}),
            "long": pack({"type": "job", "job_id": "long", "prompt": "x" * 5000}),
            "types": pack({"type": "job", "job_id": "types", "prompt": "ok", "slo_ms": "soon"}),
            "prompt-int": pack({"type": "job", "job_id": "prompt-int", "prompt": 12}),
            "model": pack({"type": "job", "job_id": "model", "prompt": "a cat", "cascade": "dalle-9"}),
            "format": pack({"type": "job", "job_id": "format", "prompt": "a cat", "image_format": "bmp"}),
            "seed": pack({"type": "job", "job_id": "seed", "prompt": "a cat", "seed": -4}),
            "plain-slo": {"job_id": "plain-slo", "prompt": "a cat", "slo_ms": "abc"},
        }
        for fields in cases.values():
            _xadd(r, fields)
        # No job id can be read from these: they become dead letters.
        _xadd(r, {"m": b"\xc1\xff not msgpack"})
        _xadd(r, {"m": msgpack.packb([1, 2, 3])})
        _xadd(r, {"m": msgpack.packb({"prompt": "no id"})})
        codes = {job_id: _result(r, job_id).error_code for job_id in cases}
        assert codes == {
            "empty": "invalid_request",
            "missing": "invalid_request",
            "long": "prompt_too_long",
            "types": "invalid_request",
            "prompt-int": "invalid_request",
            "model": "unknown_model",
            "format": "invalid_request",
            "seed": "invalid_request",
            "plain-slo": "invalid_request",
        }
        deadline = time.monotonic() + 10
        while r.xlen(KEYS.dead_letters) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        dead = [DeadLetter.decode(f[b"m"]) for _id, f in r.xrange(KEYS.dead_letters)]
        assert sorted(d.error_code for d in dead) == ["invalid_request", "malformed", "malformed"]
        # A plain-field job (redis-cli style) still works, and every service is alive.
        _xadd(r, {"job_id": "plain-ok", "prompt": "a lighthouse at dusk"})
        assert _result(r, "plain-ok").status == "ok"
        assert all(stack.alive().values())
        assert "Traceback" not in (tmp_path / "logs" / "router.log").read_text()
        # Counted in the router's metrics (the router is the first service, on the base port),
        # which never carry prompt text.
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        errors = {
            code: float(v)
            for code, v in re.findall(r'diffserve_errors_total\{code="([a-z_]+)",service="router"\} ([0-9.]+)', text)
        }
        assert errors["invalid_request"] == 8 and errors["malformed"] == 2
        assert errors["prompt_too_long"] == 1 and errors["unknown_model"] == 1
        assert "lighthouse" not in text and 'diffserve_ready{service="router"} 1.0' in text


@pytest.mark.slow
def test_tiny_backend_renders_real_images_and_seeds_reproduce_over_http(redis_server, tmp_path, tiny_models):
    prompts = ["a red cube on a table", "a watercolor fox", "an old map of a harbour", "neon city at night"]
    port = free_port()
    with _stack(
        redis_server,
        tmp_path,
        backend="tiny",
        model_dir=tiny_models,
        light_workers=1,
        heavy_workers=1,
        env={},
        gateway_port=port,
    ):  # default thumbnails (224 px) on a real backend
        results, delivered = asyncio.run(_submit_and_count(redis_server.url, prompts, rate=50))
        # The openai SDK through the gateway: the same seed gives the same bytes, another seed others.
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="any", max_retries=0, timeout=120)

        # A deadline nothing misses on a busy machine: the same model answers each time, not a degraded light one.
        def image(seed: int):
            body = {"seed": seed, "slo_ms": 600_000}
            return sdk.images.generate(prompt="a red fox in the snow", extra_body=body).data[0]

        images = {seed: image(seed) for seed in (42, 43)}
        again = image(42)
    assert images[42].model_extra["diffserve"]["seed"] == 42
    assert again.model_extra["diffserve"]["answered_by"] == images[42].model_extra["diffserve"]["answered_by"]
    assert again.b64_json == images[42].b64_json != images[43].b64_json
    assert delivered == len(prompts)
    for result in results:
        assert result.status == "ok", result.error_message
        image = Image.open(io.BytesIO(result.image))
        assert image.format == "PNG" and image.size == (64, 64)
        assert 0.0 <= result.confidence <= 1.0
        assert result.model == {"light": "sdturbo", "heavy": "sdv15"}[result.answered_by]
        colours = image.getcolors(maxcolors=64 * 64)
        assert len(colours) > 10  # a rendered image, not a flat placeholder


@pytest.mark.slow
@pytest.mark.parametrize("victim_role", ["heavy"])
def test_worker_killed_mid_batch_loses_nothing(redis_server, tmp_path, victim_role):
    """All jobs go heavy (threshold above any confidence); one heavy worker is SIGKILLed while
    it holds a batch; its entries are reclaimed and finished by the other one, exactly once."""
    r = redis.Redis.from_url(redis_server.url)
    prompts = load_prompts()[:24]
    env = {
        "DIFFSERVE_THRESHOLD": "1.01",
        "DIFFSERVE_RECLAIM_IDLE_MS": "1500",
        "DIFFSERVE_BATCH": "4",
        "DIFFSERVE_LATE_POLICY": "heavy",
    }
    with _stack(redis_server, tmp_path, light_workers=1, heavy_workers=2, time_scale=0.2, env=env) as stack:

        async def scenario():
            async with Client(redis_url=redis_server.url) as client:
                tasks = [asyncio.create_task(client.submit(p, timeout=120)) for p in prompts]
                victim = None
                deadline = time.monotonic() + 30
                while victim is None and time.monotonic() < deadline:
                    for c in r.xinfo_consumers(KEYS.heavy_queue, "workers"):
                        name = c["name"].decode()
                        if c["pending"] > 0 and name in stack.procs:
                            victim = name
                            break
                    await asyncio.sleep(0.02)
                assert victim, "no heavy worker ever held a batch"
                pending_before = r.xpending_range(KEYS.heavy_queue, "workers", "-", "+", 100, victim)
                stack.kill(victim)
                results = await asyncio.gather(*tasks)
                await asyncio.sleep(0.5)
                return victim, pending_before, results, await client.redis.xlen(client.reply_stream)

        victim, pending_before, results, delivered = asyncio.run(scenario())
    assert pending_before, "the victim held entries when killed"
    assert delivered == len(prompts)
    assert sorted(r_.status for r_ in results) == ["ok"] * len(prompts)
    assert {r_.answered_by for r_ in results} == {"heavy"}
    assert victim not in {r_.job_id for r_ in results}
    survivors = [name for name in stack.procs if name.startswith("worker") and name != victim]
    assert any("reclaimed entries" in (tmp_path / "logs" / f"{n}.log").read_text() for n in survivors)


def _hostile_entries(rng) -> list[tuple[str | None, dict]]:
    """(job id if one is readable, XADD fields): garbage, wrong types, unicode edge cases, huge and
    negative params, invalid UTF-8 inside msgpack strings, oversized entries."""
    out: list[tuple[str | None, dict]] = []
    for _ in range(25):  # random bytes: nothing readable
        out.append((None, {"m": bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))}))
    odd_values = [
        None,
        True,
        -1,
        2**64 - 1,
        -(2**63),
        1e308,
        float("nan"),
        float("-inf"),
        "",
        "x" * 3000,
        [1, [2, [3]]],
        {"a": {"b": None}},
        b"\x00\xff",
    ]
    for i in range(40):  # a readable id with hostile fields
        body = {"job_id": f"hostile-{i}", "prompt": rng.choice(["a cat", "", 7, None, ["p"], "\x00"])}
        for key in rng.sample(["slo_ms", "seed", "image_format", "image_quality", "reply_to", "cascade", "v"], 3):
            body[key] = rng.choice(odd_values)
        out.append((f"hostile-{i}", {"m": msgpack.packb(body, use_bin_type=True)}))
    unicode_prompts = [
        "🦊🌲" * 50,
        "مرحبا بالعالم",
        "e\u0301" * 300,
        "zero\u200bwidth\u2060joiner",
        "\U0010ffff",
        "ſtraße ﬁ",
        "\u202eRTL override",
        "a" * 2000,
    ]
    for i, prompt in enumerate(unicode_prompts):  # valid: must be served
        out.append((f"unicode-{i}", {"m": msgpack.packb({"job_id": f"unicode-{i}", "prompt": prompt})}))
    for i in range(5):  # invalid UTF-8 in a msgpack str: the payload is malformed as a whole
        out.append((None, {"m": b"\x82\xa6job_id\xa4bad" + bytes([i]) + b"\xa6prompt\xa3\xff\xfe\xfd"}))
    for i in range(5):  # oversized entries (over the 64 KiB limit): read as stubs, answered under their id
        out.append((f"huge-{i}", {"m": msgpack.packb({"job_id": f"huge-{i}", "prompt": "p" * 70000})}))
    return out


@pytest.mark.slow
def test_hostile_entries_are_all_answered_or_dead_lettered_and_counted(redis_server, tmp_path):
    import random

    r = redis.Redis.from_url(redis_server.url)
    entries = _hostile_entries(random.Random(0))
    metrics_port = free_port()
    with _stack(
        redis_server, tmp_path, light_workers=1, heavy_workers=1, time_scale=0.001, metrics_base_port=metrics_port
    ) as stack:
        for _job_id, fields in entries:
            _xadd(r, fields)
        results = {job_id: _result(r, job_id) for job_id, _f in entries if job_id}
        expected_dead = sum(job_id is None for job_id, _f in entries)
        deadline = time.monotonic() + 20
        while r.xlen(KEYS.dead_letters) < expected_dead and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.xlen(KEYS.dead_letters) == expected_dead
        assert all(stack.alive().values())
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    errors = sum(
        float(v) for v in re.findall(r'diffserve_errors_total\{code="[a-z_]+",service="router"\} ([0-9.]+)', text)
    )
    failed = [j for j, res in results.items() if res.status == "error"]
    assert errors == len(failed) + expected_dead  # every refusal is counted
    assert all(results[f"unicode-{i}"].status == "ok" for i in range(8))
    assert all(results[f"huge-{i}"].error_code == "invalid_request" for i in range(5))
    assert all(res.error_code for res in results.values() if res.status == "error")
    # every readable job got exactly one result list entry
    assert all(r.llen(KEYS.result(j)) == 0 for j in results)
