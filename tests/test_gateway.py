"""The HTTP gateway against a live profiled stack (real processes, its own redis-server):
the official openai SDK for the images API, httpx for the jobs API, a real Chromium for
the playground.

Which job goes on to the heavy model is fixed by a confidence file: prompt 0 of the prompt
set scores 0.99 (answered by the light model), prompt 1 scores 0.01 (escalated).

Longer than 500 lines on purpose: every test here shares one started stack (a module-scoped fixture of
three gateways); starting it is the cost a split would double."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import httpx
import openai
import pytest
import redis
import redis.asyncio as aioredis
from PIL import Image
from prometheus_client import generate_latest

from common import metrics
from common.config import Keys
from common.localstack import LocalStack, RedisServer, StackSpec, free_port
from common.messages import FinalResult, Plan, RoutedJob
from common.plan_store import store_plan
from common.profiles import load_prompts
from services.gateway.keys import hash_key
from services.gateway.request import result_error

pytestmark = pytest.mark.slow
KEYS = Keys()
ALICE, BOB, CAROL = "sk-alice-0123456789", "sk-bob-0123456789", "sk-carol-0123456789"
PROMPTS = load_prompts()
LIGHT_PROMPT, HEAVY_PROMPT = PROMPTS[0], PROMPTS[1]


class Stack:
    def __init__(self, stack: LocalStack, port: int, open_port: int, replica_port: int):
        self.stack, self.port, self.open_port = stack, port, open_port
        self.url, self.open_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{open_port}"
        self.replica_url = f"http://127.0.0.1:{replica_port}"
        self.redis = redis.Redis.from_url(stack.redis_url)
        self.clients: list[openai.OpenAI | httpx.Client] = []  # closed with the stack (their connections)

    def sdk(self, key: str = ALICE, url: str | None = None) -> openai.OpenAI:
        client = openai.OpenAI(base_url=(url or self.url) + "/v1", api_key=key, max_retries=0, timeout=60)
        self.clients.append(client)
        return client

    def http(self, key: str | None = ALICE) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=60)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.redis.close()

    def metrics(self, name: str) -> str:
        """The /metrics text of a process of the stack, from its metrics port."""
        port = self.stack.metrics_ports[name]
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    def sample(self, name: str, sample: str) -> float:
        """One sample (``family{labels}`` as exposed) of a process's metrics, 0 when absent."""
        match = re.search(rf"^{re.escape(sample)} (\S+)$", self.metrics(name), re.M)
        return float(match.group(1)) if match else 0.0

    def processed(self, worker: str, outcome: str) -> float:
        """A worker's diffserve_processed_total{service="worker", outcome=...} (worker-0 is light)."""
        return self.sample(worker, f'diffserve_processed_total{{outcome="{outcome}",service="worker"}}')

    def fill_light_queue(self, n: int) -> None:
        """Queue n light jobs nobody waits for (the light worker paused: they stay queued)."""
        before = self.light_backlog()
        for _ in range(n):
            self.redis.xadd(KEYS.jobs, {"job_id": f"filler-{time.monotonic_ns()}", "prompt": LIGHT_PROMPT})
        deadline = time.monotonic() + 5
        while self.light_backlog() < before + n and time.monotonic() < deadline:
            time.sleep(0.02)

    def drained(self) -> None:
        """Wait until the light queue is empty again (what a test queued has been served)."""
        deadline = time.monotonic() + 30
        while self.light_backlog() and time.monotonic() < deadline:
            time.sleep(0.05)

    def light_backlog(self) -> int:
        return int(httpx.get(self.open_url + "/v1/status", timeout=5).json()["queues"]["light_queue"])

    def pause(self, name: str):
        """SIGSTOP a service until the block ends: what it has not started, it starts only after."""
        return _Paused(self.stack.procs[name])


class _Paused:
    def __init__(self, proc):
        self.proc = proc

    def __enter__(self):
        self.proc.send_signal(signal.SIGSTOP)

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    confidence = tmp / "confidence.csv"
    confidence.write_text("prompt_index,confidence\n0,0.99\n1,0.01\n")
    keys_file = tmp / "keys.json"
    keys_file.write_text(
        f'{{"keys": [{{"name": "alice", "sha256": "{hash_key(ALICE)}", "rpm": 10000, "max_in_flight": 100}},'
        f' {{"name": "bob", "sha256": "{hash_key(BOB)}", "rpm": 2, "burst": 2}}]}}'
    )
    server = RedisServer().start()
    port, open_port, replica_port = free_port(), free_port(), free_port()
    key_args = ["--api-keys-file", str(keys_file), "--api-keys", f"carol:{hash_key(CAROL)}:0:1"]
    spec = StackSpec(
        redis_url=server.url,
        time_scale=0.25,
        gateway_port=port,
        env={
            "DIFFSERVE_CONFIDENCE_FILE": str(confidence),
            "DIFFSERVE_BATCH": "1",
            "DIFFSERVE_WATCH_S": "0.05",  # the heavy worker reads cancel flags and sends progress this often
            "DIFFSERVE_MAX_LIGHT_BACKLOG": "4",  # overload on demand: 4 queued light jobs and the next is refused
        },
        gateway_args=key_args,
    )
    local = LocalStack(spec, str(tmp / "logs"))
    try:
        local.start()
        # A second replica with the same keys (limits are shared through Redis), and one without
        # keys (as `diffserve up` runs it) for the playground.
        local.spawn(
            "gateway-replica", "gateway", "--port", str(replica_port), "--cors-origins", "http://app.example", *key_args
        )
        local.spawn("gateway-open", "gateway", "--port", str(open_port))
        local.wait_ready(["gateway-replica", "gateway-open"])
        gateway = Stack(local, port, open_port, replica_port)
        yield gateway
        gateway.close()
    finally:
        local.stop()
        server.stop()


def _decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


# ---------------------------------------------------------------- images API (openai SDK)


@pytest.mark.parametrize("fmt,pil", [("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG")])
def test_sdk_generate_decodes_in_each_format(stack, fmt, pil):
    resp = stack.sdk().images.generate(
        model="sdturbo-sdv15", prompt=LIGHT_PROMPT, output_format=fmt, output_compression=80, size="auto", user="test"
    )
    assert resp.output_format == fmt and resp.size == "512x512" and resp.created > 0
    assert len(resp.data) == 1 and resp.data[0].revised_prompt is None
    assert _decode(resp.data[0].b64_json).format == pil
    ours = resp.data[0].model_extra["diffserve"]
    assert ours["answered_by"] == "light" and ours["model"] == "sdturbo" and ours["confidence"] == 0.99
    assert ours["degraded"] is False and ours["slo_met"] is True and ours["latency_ms"] > 0


def test_n3_gives_three_images_from_three_jobs_with_distinct_seeds(stack):
    resp = stack.sdk().images.generate(prompt=HEAVY_PROMPT, n=3, extra_body={"unknown_field": [1, 2]})
    assert len(resp.data) == 3
    ours = [d.model_extra["diffserve"] for d in resp.data]
    assert len({x["job_id"] for x in ours}) == 3 and len({x["seed"] for x in ours}) == 3
    # escalated; a job the one heavy worker cannot finish by its deadline gets its light image, degraded
    assert all(x["confidence"] == 0.01 and (x["answered_by"] == "heavy" or x["degraded"]) for x in ours)
    assert all(_decode(d.b64_json).format == "PNG" for d in resp.data)
    for x in ours:  # three jobs, each with its own exactly-once result
        assert stack.redis.exists(KEYS.done(x["job_id"]))


def test_url_response_format_serves_the_image_from_the_gateway(stack):
    resp = stack.sdk().images.generate(prompt=LIGHT_PROMPT, response_format="url", output_format="webp")
    url = resp.data[0].url
    assert url.startswith(stack.url) and resp.data[0].b64_json is None
    got = httpx.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(got.content)).format == "WEBP"
    assert httpx.get(stack.url + "/v1/images/files/nope.png").status_code == 404


def test_stream_escalated_job_yields_partial_then_completed(stack):
    events = list(stack.sdk().images.generate(prompt=HEAVY_PROMPT, stream=True, partial_images=1))
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    partial, completed = events
    assert partial.partial_image_index == 0 and partial.model_extra["diffserve"]["model"] == "sdturbo"
    assert completed.model_extra["diffserve"]["answered_by"] == "heavy"
    assert completed.size == "512x512" and completed.output_format == "png" and completed.usage.total_tokens == 0
    light, heavy = _decode(partial.b64_json), _decode(completed.b64_json)
    assert light.convert("RGB").getpixel((0, 0)) != heavy.convert("RGB").getpixel((0, 0))  # different colours


def test_stream_light_answered_job_yields_only_completed(stack):
    events = list(stack.sdk().images.generate(prompt=LIGHT_PROMPT, stream=True, partial_images=1))
    assert [e.type for e in events] == ["image_generation.completed"]
    assert events[0].model_extra["diffserve"]["answered_by"] == "light"


def test_stream_without_partials_asked_sends_no_partial(stack):
    events = list(stack.sdk().images.generate(prompt=HEAVY_PROMPT, stream=True, partial_images=0))
    assert [e.type for e in events] == ["image_generation.completed"]


def test_models_list_names_the_cascade_with_its_slo_and_sizes(stack):
    sdk = stack.sdk()
    models = sdk.models.list()
    assert [m.id for m in models.data] == ["sdturbo-sdv15"] and models.data[0].owned_by == "diffserve"
    ours = models.data[0].model_extra["diffserve"]
    assert ours["light"] == "sdturbo" and ours["heavy"] == "sdv15" and ours["slo_ms"] == 5000
    assert ours["sizes"] == ["512x512"] and ours["steps"] == {"light": 1, "heavy": 50}
    assert sdk.models.retrieve("sdturbo-sdv15").id == "sdturbo-sdv15"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("dall-e-3")


def test_the_placeholder_is_at_the_size_the_response_says(stack):
    resp = stack.sdk().images.generate(prompt=HEAVY_PROMPT, extra_body={"seed": 7})
    image = _decode(resp.data[0].b64_json)
    assert resp.size == "512x512" and image.size == (512, 512)
    assert resp.data[0].model_extra["diffserve"]["seed"] == 7


@pytest.mark.parametrize(
    "field,value",
    [
        ("quality", "bogus"),
        ("background", "bogus"),
        ("background", "transparent"),  # valid for OpenAI, but these images are opaque
        ("style", "bogus"),
        ("moderation", "bogus"),
    ],
)
def test_bad_values_of_openai_enum_fields_are_a_400_naming_the_field(stack, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        stack.sdk().images.generate(prompt=LIGHT_PROMPT, **{field: value})
    assert caught.value.status_code == 400 and caught.value.body["param"] == field


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"width": 256}, "width"),
        ({"height": 768}, "height"),
        ({"steps": 10}, "steps"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"negative_prompt": 5}, "negative_prompt"),
        ({"slo_ms": 0}, "slo_ms"),
        ({"cascade": "other"}, "cascade"),
    ],
)
def test_our_fields_are_honoured_or_refused_never_ignored(stack, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        stack.sdk().images.generate(prompt=LIGHT_PROMPT, extra_body=extra)
    assert caught.value.body["param"] == param


def test_a_streamed_request_under_overload_is_a_429_that_the_sdk_retries(stack):
    refused = 'diffserve_gateway_requests_total{endpoint="generations",status="429"}'
    before = stack.sample("gateway", refused)
    retrying = openai.OpenAI(base_url=stack.url + "/v1", api_key=ALICE, max_retries=5, timeout=60)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with stack.pause("worker-0"):
            stack.fill_light_queue(4)  # the light queue is full: the next job is refused at admission
            with pytest.raises(openai.RateLimitError) as caught:  # the status, not a bare APIError mid-stream
                list(stack.sdk().images.generate(prompt=LIGHT_PROMPT, stream=True))
            assert caught.value.status_code == 429 and int(caught.value.response.headers["retry-after"]) >= 1
            assert caught.value.body["code"] == "overloaded"
            streamed = pool.submit(lambda: list(retrying.images.generate(prompt=LIGHT_PROMPT, stream=True)))
            time.sleep(0.5)  # refused at least once more, then the worker resumes and the queue drains
        events = streamed.result(timeout=60)
    stack.drained()
    assert [e.type for e in events] == ["image_generation.completed"]
    assert stack.sample("gateway", refused) >= before + 2


def test_a_partly_refused_request_answers_at_once(stack):
    with stack.pause("worker-0"):
        stack.fill_light_queue(2)  # room for two of the three jobs
        started = time.monotonic()
        with stack.http() as http:
            r = http.post("/v1/images/generations", json={"prompt": LIGHT_PROMPT, "n": 3})
        took = time.monotonic() - started
        time.sleep(1.0)  # the worker stays paused: a request waiting for its two admitted jobs would still wait
    stack.drained()
    assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"]
    assert took < 1.0


def test_a_request_keeps_the_images_made_when_another_of_its_jobs_fails(stack):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with stack.pause("worker-0"):
            since = f"{int(time.time() * 1000)}-0"
            request = pool.submit(
                lambda: stack.http().post("/v1/images/generations", json={"prompt": LIGHT_PROMPT, "n": 2})
            )
            deadline = time.monotonic() + 10
            while len(queued := stack.redis.xrange(KEYS.light_queue, min=since)) < 2:
                assert time.monotonic() < deadline, request.result().text
                time.sleep(0.02)
            jobs = [RoutedJob.decode(fields[b"m"]).job_id for _id, fields in queued]
            stack.redis.set(KEYS.cancel(jobs[1]), 1)  # one of the two fails (cancelled), the other is made
        r = request.result(timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["diffserve"]["job_id"] for d in body["data"]] == [jobs[0]]
    (missing,) = body["diffserve"]["errors"]
    assert missing["error"]["code"] == "cancelled" and missing["index"] == 1 - body["data"][0]["diffserve"]["index"]


# ---------------------------------------------------------------- errors, keys, limits


@pytest.mark.parametrize(
    "body,param",
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 11}, "n"),
        ({"prompt": "x", "n": "2"}, "n"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "size": "1024x1024"}, "size"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "output_compression": 101}, "output_compression"),
        ({"prompt": "x", "response_format": "svg"}, "response_format"),
        ({"prompt": "x", "partial_images": 4}, "partial_images"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "model": "dall-e-3"}, "model"),
        ({"prompt": "x" * 2001}, "prompt"),
    ],
)
def test_bad_input_is_a_400_in_the_openai_shape(stack, body, param):
    with stack.http() as http:
        r = http.post("/v1/images/generations", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_an_overloaded_answer_is_a_429_whose_retry_after_is_the_routers_hint():
    hinted = result_error(
        FinalResult(job_id="j1", status="error", error_code="overloaded", retry_after_ms=2300)
    ).response()
    assert hinted.status_code == 429 and hinted.headers["retry-after"] == "3"
    plain = result_error(
        FinalResult(job_id="j2", status="error", error_code="overloaded")
    ).response()  # an older router
    assert plain.status_code == 429 and plain.headers["retry-after"] == "1"


def test_bad_json_and_size_message_and_counted_and_metrics_need_a_key(stack):
    with stack.http() as http:
        r = http.post("/v1/images/generations", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = http.post("/v1/images/generations", json={"prompt": "x", "size": "256x256"})
        assert "512x512" in r.json()["error"]["message"]
        metrics = http.get("/metrics").text
    with stack.http(None) as anonymous:  # keys on: the API port's /metrics is for key holders
        assert anonymous.get("/metrics").status_code == 401
    assert re.search(r'diffserve_errors_total{code="invalid_request",service="gateway"} [1-9]', metrics)
    # ... and names no key: the per-key families are on the operator's metrics port only
    assert "diffserve_gateway_key_" not in metrics and "alice" not in metrics and "bob" not in metrics
    port = stack.stack.metrics_ports["gateway"]
    operator = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'diffserve_gateway_key_requests_total{key="alice"' in operator
    assert LIGHT_PROMPT not in metrics and LIGHT_PROMPT not in operator  # never prompt text in metrics


def test_missing_or_wrong_key_is_401(stack):
    with pytest.raises(openai.AuthenticationError) as caught:
        stack.sdk("sk-wrong").images.generate(prompt=LIGHT_PROMPT)
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    with stack.http(None) as http:
        r = http.post("/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert http.get("/v1/jobs/abc").status_code == 401
        assert http.get("/healthz").status_code == 200  # health needs no key


def test_key_over_its_rate_limit_gets_429_with_retry_after_on_every_replica(stack):
    one, other = stack.sdk(BOB), stack.sdk(BOB, stack.replica_url)
    one.images.generate(prompt=LIGHT_PROMPT)
    other.images.generate(prompt=LIGHT_PROMPT)  # bob's 2 requests a minute, spent across two replicas
    for sdk in (one, other):
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.images.generate(prompt=LIGHT_PROMPT)
        retry_after = int(caught.value.response.headers["retry-after"])
        assert 1 <= retry_after <= 30  # a token every 30 s
        assert caught.value.body["code"] == "rate_limit_exceeded"
    stack.sdk(ALICE).images.generate(prompt=LIGHT_PROMPT)  # the limit is bob's, not the gateway's


def test_key_over_its_jobs_in_flight_cap_gets_429_until_one_finishes(stack):
    with stack.http(CAROL) as http:
        with stack.pause("worker-0"):
            first = http.post("/v1/jobs", json={"prompt": LIGHT_PROMPT})
            assert first.status_code == 202
            second = http.post("/v1/jobs", json={"prompt": LIGHT_PROMPT})
            assert second.status_code == 429 and second.headers["retry-after"] == "1"
            assert second.json()["error"]["code"] == "too_many_in_flight"
        job_id = first.json()["id"]
        _wait_status(http, job_id, {"done"})
        assert http.post("/v1/jobs", json={"prompt": LIGHT_PROMPT}).status_code == 202


# ---------------------------------------------------------------- jobs API (httpx)


def _wait_status(http: httpx.Client, job_id: str, wanted: set[str], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = http.get(f"/v1/jobs/{job_id}").json()
        if view["status"] in wanted:
            return view
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {view['status']}")


def test_jobs_api_events_light_ready_then_done(stack):
    with stack.http() as http:
        r = http.post("/v1/jobs", json={"prompt": HEAVY_PROMPT, "output_format": "webp"})
        assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
        job_id = r.json()["id"]
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as s:
            events = [line[7:] for line in s.iter_lines() if line.startswith("event: ")]
        assert events[0] == "queued" and events[1] == "admitted" and events[-1] == "done"
        assert "light_ready" in events
        view = http.get(f"/v1/jobs/{job_id}").json()
    assert view["status"] == "done" and view["light_image"]["model"] == "sdturbo"
    assert _decode(view["data"][0]["b64_json"]).format == "WEBP"
    assert view["data"][0]["diffserve"]["answered_by"] == "heavy"


def test_jobs_api_light_answered_and_unknown_job(stack):
    with stack.http() as http:
        job_id = http.post("/v1/jobs", json={"prompt": LIGHT_PROMPT}).json()["id"]
        view = _wait_status(http, job_id, {"done"})
        assert "light_image" not in view and view["data"][0]["diffserve"]["answered_by"] == "light"
        missing = http.get("/v1/jobs/0123456789abcdef")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert http.delete("/v1/jobs/0123456789abcdef").status_code == 404
        assert http.post("/v1/jobs", json={"prompt": "x", "n": 2}).status_code == 400
    with stack.http(BOB) as other:  # someone else's job is not found either
        assert other.get(f"/v1/jobs/{job_id}").status_code == 404


def test_jobs_api_reports_its_seed(stack):
    with stack.http() as http:
        created = http.post("/v1/jobs", json={"prompt": LIGHT_PROMPT, "seed": 1234}).json()
        assert created["seed"] == 1234
        view = _wait_status(http, created["id"], {"done"})
        random_seed = http.post("/v1/jobs", json={"prompt": LIGHT_PROMPT}).json()["seed"]
    assert view["seed"] == 1234 and view["data"][0]["diffserve"]["seed"] == 1234
    assert isinstance(random_seed, int)


def test_heavy_progress_is_streamed_and_a_cancel_stops_the_heavy_model_mid_run(stack):
    freed = 'diffserve_worker_cancel_freed_seconds_total{model="sdv15",when="during"}'
    before = stack.sample("worker-1", freed)
    events: list[tuple[str, dict]] = []
    with stack.http() as http, stack.http() as other:
        job_id = http.post("/v1/jobs", json={"prompt": HEAVY_PROMPT}).json()["id"]
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as s:
            name = None
            for line in s.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
                    if name == "progress" and sum(n == "progress" for n, _ in events) == 1:
                        assert other.delete(f"/v1/jobs/{job_id}").status_code == 202  # the heavy model is running
    names = [n for n, _ in events]
    assert names[:2] == ["queued", "admitted"] and "light_ready" in names and names[-1] == "done", names
    admitted = events[1][1]["queue"]
    assert admitted["name"] == "light" and admitted["ahead"] >= 0
    progress = events[names.index("progress")][1]["progress"]
    assert progress["steps"] == 50 and 1 <= progress["step"] < 50 and progress["model"] == "sdv15"
    final = events[-1][1]
    assert final["status"] == "cancelled" and "stopped after step" in final["error"]["message"], final
    assert stack.sample("worker-1", freed) > before


def test_each_service_exports_only_its_own_metric_families(stack):
    def families(text: str) -> set[str]:  # a counter's _created series belongs to it
        return {f for f in re.findall(r"^# TYPE (diffserve_\S+) ", text, re.M) if not f.endswith("_created")}

    for name, service in [
        ("router", "router"),
        ("discriminator", "discriminator"),
        ("worker-0", "worker"),
        ("gateway", "gateway"),
    ]:
        exported = families(stack.metrics(name))
        assert exported == families(generate_latest(metrics.registry(service)).decode()), name
    assert not any(f.startswith("diffserve_gateway_") for f in families(stack.metrics("router")))
    assert "diffserve_threshold" not in families(stack.metrics("worker-0"))
    # one meaning per name: the discriminator's last-batch threshold is not the plan's
    assert "diffserve_threshold" not in families(stack.metrics("discriminator"))
    assert "diffserve_discriminator_threshold" in families(stack.metrics("discriminator"))


def test_a_wrong_method_is_a_405_with_allow_and_a_code(stack):
    r = httpx.put(stack.url + "/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_cors_is_opt_in_per_origin(stack):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    allowed = httpx.options(stack.replica_url + "/v1/images/generations", headers=preflight)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://app.example"
    other = httpx.options(
        stack.replica_url + "/v1/images/generations", headers={**preflight, "Origin": "http://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers
    default = httpx.options(stack.url + "/v1/images/generations", headers=preflight)  # no --cors-origins
    assert "access-control-allow-origin" not in default.headers


def _one_final(stack: Stack, job_id: str) -> None:
    entries = stack.redis.xrange(f"{KEYS.reply_prefix}job-{job_id}")
    finals = [e for _id, e in entries if b"final_result" in e[b"m"]]
    assert len(finals) == 1, f"{len(finals)} final results"
    assert FinalResult.decode(finals[0][b"m"]).status == "cancelled"


def test_cancel_before_the_worker_starts_never_runs_and_ends_cancelled_once(stack):
    with stack.http() as http:
        before = stack.processed("worker-0", "light")
        with stack.pause("worker-0"):  # admitted and queued, but no GPU has started it
            job_id = http.post("/v1/jobs", json={"prompt": LIGHT_PROMPT}).json()["id"]
            time.sleep(0.3)
            r = http.delete(f"/v1/jobs/{job_id}")
            assert r.status_code == 202 and r.json()["cancel_requested"] is True
        view = _wait_status(http, job_id, {"cancelled", "done", "error"})
        assert view["status"] == "cancelled" and "data" not in view
        time.sleep(0.5)
        assert stack.processed("worker-0", "light") == before
        assert stack.processed("worker-0", "cancelled") >= 1
        _one_final(stack, job_id)
        assert http.delete(f"/v1/jobs/{job_id}").status_code == 200  # already over: nothing to cancel


def test_cancel_before_admission_is_answered_by_the_router(stack):
    with stack.http() as http:
        before = stack.processed("worker-0", "light") + stack.processed("worker-0", "cancelled")
        with stack.pause("router"):
            job_id = http.post("/v1/jobs", json={"prompt": LIGHT_PROMPT}).json()["id"]
            assert http.delete(f"/v1/jobs/{job_id}").status_code == 202
        assert _wait_status(http, job_id, {"cancelled", "done", "error"})["status"] == "cancelled"
        assert stack.processed("worker-0", "light") + stack.processed("worker-0", "cancelled") == before
        _one_final(stack, job_id)


def test_client_disconnecting_from_a_sync_request_cancels_its_jobs(stack):
    before = stack.processed("worker-0", "light")
    cancels = len(stack.redis.keys(KEYS.cancel_prefix + "*"))
    with stack.pause("worker-0"):
        with pytest.raises(httpx.ReadTimeout):
            stack.http().post("/v1/images/generations", json={"prompt": LIGHT_PROMPT, "n": 2}, timeout=0.5)
        deadline = time.monotonic() + 5
        while len(stack.redis.keys(KEYS.cancel_prefix + "*")) < cancels + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(stack.redis.keys(KEYS.cancel_prefix + "*")) == cancels + 2
    time.sleep(1.0)
    assert stack.processed("worker-0", "light") == before  # neither job ran


def test_client_disconnecting_from_a_stream_cancels_its_jobs(stack):
    before = stack.processed("worker-0", "light")
    cancels = len(stack.redis.keys(KEYS.cancel_prefix + "*"))
    with stack.pause("worker-0"):
        with stack.http() as http:
            with http.stream(
                "POST",
                "/v1/images/generations",
                json={"prompt": LIGHT_PROMPT, "n": 3, "stream": True, "partial_images": 1},
            ) as r:
                assert r.status_code == 200
        # the connection is closed without reading a single event
        deadline = time.monotonic() + 5
        while len(stack.redis.keys(KEYS.cancel_prefix + "*")) < cancels + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(stack.redis.keys(KEYS.cancel_prefix + "*")) == cancels + 3
    time.sleep(1.0)
    assert stack.processed("worker-0", "light") == before


def test_sigterm_drains_a_request_in_flight(stack):
    port = free_port()
    stack.stack.spawn("gateway-drain", "gateway", "--port", str(port))
    stack.stack.wait_ready(["gateway-drain"])
    proc = stack.stack.procs["gateway-drain"]

    async def go():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            with stack.pause("worker-0"):
                request = asyncio.ensure_future(http.post("/v1/images/generations", json={"prompt": LIGHT_PROMPT}))
                await asyncio.sleep(0.5)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                assert proc.poll() is None  # still draining
            return await request

    response = asyncio.run(go())
    assert response.status_code == 200 and response.json()["data"][0]["b64_json"]
    assert proc.wait(timeout=30) == 0
    assert b'"msg": "stopped"' in (stack.stack.log_dir / "gateway-drain.log").read_bytes()


# ---------------------------------------------------------------- health and status


def _store_plan(stack: Stack) -> None:
    """What the controller would store (these stacks run without one)."""

    async def put():
        r = aioredis.Redis.from_url(stack.stack.redis_url)
        await store_plan(r, KEYS, Plan(version=7, threshold=0.5, light_workers=1, heavy_workers=1))
        await r.aclose()

    asyncio.run(put())


def test_healthz_readyz_status(stack):
    with stack.http() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        stack.redis.delete(KEYS.plan)
        r = http.get("/readyz")
        assert r.status_code == 503 and r.json()["plan"] is False and r.json()["workers"] == 2  # no controller
        _store_plan(stack)
        assert http.get("/readyz").status_code == 200
        status = http.get("/v1/status").json()
    assert status["plan"]["version"] == 7 and status["workers"] == {"light": 1, "heavy": 1}
    assert set(status["queues"]) == {"jobs", "light_queue", "light_results", "heavy_queue", "completions"}


# ---------------------------------------------------------------- the playground in a real browser


def _chromium() -> tuple[str, str]:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("chromium/chromium-driver missing and apt-get is not usable here (not root)")
        subprocess.run(
            ["apt-get", "install", "-y", "chromium", "chromium-driver"], check=False, capture_output=True, timeout=600
        )
        if not (shutil.which("chromium") and shutil.which("chromedriver")):
            pytest.skip("apt-get install chromium chromium-driver failed (no package source?)")
    return shutil.which("chromium"), shutil.which("chromedriver")


def _store_heavy_off_plan(stack: Stack) -> None:
    async def put():
        r = aioredis.Redis.from_url(stack.stack.redis_url)
        await store_plan(r, KEYS, Plan(version=8, threshold=0.5, light_workers=2, heavy_workers=0))
        await r.aclose()

    asyncio.run(put())


def test_playground_preview_progress_final_cancel_history(stack, tmp_path):
    """A user's session in Chromium: the light preview (marked) with the heavy model's progress, then the
    final image; a queued job cancelled; the history with downloads; the panel for a plan without the
    heavy model.  A screenshot of each state is written to this test's tmp dir."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    binary, driver_path = _chromium()
    _store_plan(stack)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=DriverService(driver_path), options=options)
    shots = []

    def shot(name: str) -> None:
        path = tmp_path / f"playground-{name}.png"
        driver.save_screenshot(str(path))
        shots.append(path)

    def card(js: str) -> object:  # evaluated on the first card
        return driver.execute_script(f"const c = document.querySelector('.card'); return c && {js};")

    try:
        driver.get(stack.open_url + "/")
        wait = WebDriverWait(driver, 30, poll_frequency=0.02)
        # Record every stage the frame shows (the preview is on screen for ~0.4 s only).
        driver.execute_script("""window.seen = [];
            new MutationObserver(() => { const f = document.querySelector('.card .frame');
                                         if (f) window.seen.push(f.dataset.stage); })
              .observe(document.getElementById('cards'), {attributes: true, subtree: true, childList: true,
                                                           attributeFilter: ['data-stage']});""")
        driver.find_element(By.ID, "prompt").send_keys(HEAVY_PROMPT)
        driver.find_element(By.ID, "seed").send_keys("77")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: card("c.querySelector('.frame').dataset.stage") == "light")
        assert card("getComputedStyle(c.querySelector('.frame .tag')).display") == "block"  # marked as preview
        shot("preview")
        wait.until(lambda d: card("c.querySelector('progress').value") or card("c.dataset.answeredBy"))
        if not card("c.dataset.answeredBy"):
            assert "sdv15 step" in card("c.querySelector('.state').textContent")
            shot("progress")
        wait.until(lambda d: card("c.querySelector('.frame').dataset.stage") == "final")
        seen = [x for x in driver.execute_script("return window.seen") if x in ("light", "final")]
        assert seen[0] == "light" and seen[-1] == "final", seen
        label = card("c.querySelector('.label').textContent")
        assert "answered by heavy (sdv15)" in label and " ms" in label and "not degraded" in label
        assert "seed 77" in label
        assert card("getComputedStyle(c.querySelector('.frame img')).imageRendering") != "pixelated"
        wait.until(lambda d: "threshold" in d.find_element(By.ID, "plan").text)
        assert "heavy_queue" in driver.find_element(By.ID, "queues").text
        history = driver.find_elements(By.CSS_SELECTOR, "#history li a[download]")
        assert len(history) == 1 and history[0].get_attribute("href").startswith("data:image/png;base64,")
        shot("final")
        if os.environ.get("DIFFSERVE_SCREENSHOT"):  # how docs/playground.png is made: the preview at work
            shutil.copy(shots[1 if len(shots) > 2 else 0], os.environ["DIFFSERVE_SCREENSHOT"])

        with stack.pause("worker-0"):  # a queued job, cancelled from the page
            prompt = driver.find_element(By.ID, "prompt")
            prompt.clear()
            prompt.send_keys(LIGHT_PROMPT)
            driver.find_element(By.ID, "go").click()
            wait.until(lambda d: "ahead" in (card("c.querySelector('.state').textContent") or ""))
            shot("queued")
            driver.find_element(By.CSS_SELECTOR, ".card button.cancel").click()
            # the page's DELETE sets the flag before the light worker runs again (else it may run the job)
            job_id = card("c.dataset.jobId")
            with redis.Redis.from_url(stack.stack.redis_url) as flags:
                wait.until(lambda d: flags.exists(KEYS.cancel(job_id)))
        # resumed, the light worker finds the job cancelled before it starts: answered, never run
        wait.until(lambda d: (card("c.querySelector('.state').textContent") or "").startswith("cancelled"))
        shot("cancelled")

        _store_heavy_off_plan(stack)  # the panel that says the heavy model is off
        wait.until(lambda d: d.find_element(By.ID, "heavy-off").is_displayed())
        assert "no heavy worker" in driver.find_element(By.ID, "heavy-off").text
        shot("heavy-off")
    finally:
        driver.quit()
        _store_plan(stack)
    for path in shots:
        with Image.open(path) as shot:
            assert shot.size[0] > 0


# ---------------------------------------------------------------- no Redis


def test_redis_gone_is_a_503_and_the_gateway_keeps_running(tmp_path):
    server = RedisServer().start()
    port = free_port()
    env = {**os.environ, "REDIS_URL": server.url, "DIFFSERVE_INSTANCE_ID": "gw"}
    with open(tmp_path / "gateway.log", "wb") as log:  # the process has its own copy
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.gateway", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=log,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # up and connected, by its own health endpoint (no workers here)
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).json()["redis"]:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        server.stop()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json={"prompt": "x"}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "unavailable"
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30).json()["redis"] is False
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
