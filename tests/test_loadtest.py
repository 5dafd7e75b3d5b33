"""The load tester: trace generators, the report's quality estimate, and a short time-scaled
replay of two policies against real local stacks (real redis-servers, real processes)."""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from common.config import RedisSettings
from common.messages import FinalResult
from common.profiles import QualityCurve, load_cascade_profile, load_prompts
from common.quality import QualityModel
from loadtest import report
from loadtest.plots import PLOTS
from loadtest.runner import JobRecord, RunRecord
from loadtest.traces import Trace, generate, read_trace, write_trace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAS_CONTROLLER = importlib.util.find_spec("services.controller") is not None


def _rate(trace: Trace, a_s: float, b_s: float) -> float:
    return sum(a_s * 1000 <= ms < b_s * 1000 for ms in trace.arrivals_ms) / (b_s - a_s)


def test_poisson_rate_and_seeding():
    t = generate("poisson", rate=20, duration_s=200, seed=3, n_prompts=100)
    assert abs(t.mean_rate - 20) < 2  # 4000 arrivals: sd ~ 0.3 q/s
    assert t.arrivals_ms == sorted(t.arrivals_ms) and 0 <= min(t.arrivals_ms) and max(t.arrivals_ms) < 200_000
    assert all(0 <= i < 100 for i in t.prompt_indices)
    assert generate("poisson", rate=20, duration_s=200, seed=3, n_prompts=100).arrivals_ms == t.arrivals_ms
    assert generate("poisson", rate=20, duration_s=200, seed=4, n_prompts=100).arrivals_ms != t.arrivals_ms


def test_step_ramp_bursty_shapes():
    step = generate("step", rate=30, low_rate=5, duration_s=300, seed=1)
    assert abs(_rate(step, 0, 100) - 5) < 1.5 and abs(_rate(step, 100, 200) - 30) < 3
    assert abs(_rate(step, 200, 300) - 5) < 1.5
    ramp = generate("ramp", rate=40, low_rate=4, duration_s=300, seed=1)
    assert _rate(ramp, 0, 60) < _rate(ramp, 120, 180) < _rate(ramp, 240, 300)
    assert abs(_rate(ramp, 0, 60) - (4 + 36 * 0.1)) < 2 and abs(_rate(ramp, 240, 300) - (4 + 36 * 0.9)) < 4
    bursty = generate("bursty", duration_s=600, seed=2)  # defaults: 4 q/s base, 32 q/s bursts
    per_5s = bursty.rate_per_bin(5.0)
    assert max(per_5s) > 24  # bursts near the 32 q/s peak
    assert sorted(per_5s)[len(per_5s) // 4] < 8  # most of the time near the base rate
    assert 5 < bursty.mean_rate < 16


def test_trace_file_round_trip(tmp_path):
    t = generate("bursty", duration_s=60, seed=5, n_prompts=50)
    path = tmp_path / "trace.csv"
    write_trace(t, path)
    back = read_trace(path, n_prompts=50)
    assert back.prompt_indices == t.prompt_indices
    assert all(abs(a - b) < 1e-3 for a, b in zip(back.arrivals_ms, t.arrivals_ms, strict=False))
    assert back.duration_s == math.ceil(t.arrivals_ms[-1] / 1000)
    hand = tmp_path / "hand.csv"
    hand.write_text("# recorded\n250,3\n0,1\n\n1000.5,2\n")
    h = read_trace(hand)
    assert h.arrivals_ms == [0.0, 250.0, 1000.5] and h.prompt_indices == [1, 3, 2]
    (tmp_path / "bad.csv").write_text("12;4\n")
    with pytest.raises(ValueError):
        read_trace(tmp_path / "bad.csv")
    (tmp_path / "range.csv").write_text("12,40\n")
    with pytest.raises(ValueError):
        read_trace(tmp_path / "range.csv", n_prompts=10)


def test_quality_estimate_matches_hand_computation():
    curve = load_cascade_profile("sdturbo-sdv15").quality
    share = lambda c: 1.0 - c  # noqa: E731  (a confidence c: the share of prompts at least as confident)
    # the discriminator's own split: light answers are the window's most confident prompts
    answers = (
        [(0.5, "light", 0.9)] * 5
        + [(1.0, "heavy", 0.1)] * 5  # window 0: share 0.5
        + [(6.0, "light", 0.8)] * 4  # window 1: share 1.0
        + [(12.0, "heavy", 0.2)] * 5  # window 2: share 0.0
        + [(21.0, "light", 0.7)] * 3
        + [(24.9, "heavy", 0.3)]
    )  # window 4: 0.75; window 3 has no answers
    q = QualityModel(curve, share).estimate(answers)
    expected = (16.95 + 22.77 + 18.55 + (17.95 + 18.86) / 2) / 4  # the CSV's values, 0.75 interpolated
    assert q["windows"] == 4
    assert q["estimate"] == pytest.approx(expected, abs=1e-3)
    assert q["paper_estimate"] == pytest.approx(expected, abs=1e-3)
    assert [w["light_share"] for w in q["per_window"]] == [0.5, 1.0, 0.0, 0.75]
    assert q["all_heavy"] == 18.55 and q["all_light"] == 22.77
    # A made-up linear curve: the estimate is the mean of the per-window shares mapped through it.
    linear = QualityCurve([0.0, 1.0], [10.0, 20.0])
    linear_estimate = QualityModel(linear, share).estimate(answers)["estimate"]
    assert linear_estimate == pytest.approx(10 + 10 * (0.5 + 1 + 0 + 0.75) / 4)
    # Degraded: the light answers are hard prompts (a heavy answer was more confident). The paper's
    # method does not see it; the estimate charges the difference in the curve's slopes.
    swapped = [(0.5, "light", 0.1)] * 5 + [(1.0, "heavy", 0.9)] * 5
    q = QualityModel(curve, share).estimate(swapped)
    assert q["paper_estimate"] == pytest.approx(16.95)
    slope = lambda s: (curve.score(min(1, s + 0.005)) - curve.score(max(0, s - 0.005))) / 0.01  # noqa: E731
    assert q["estimate"] == pytest.approx(16.95 + (slope(0.9) - slope(0.1)) * 5 / 10, abs=1e-3)
    assert q["estimate"] > q["paper_estimate"]


def _result(job_id, by="light", ok=True, latency=100.0, slo=True, degraded=False, code=None, conf=0.8):
    return FinalResult(
        job_id=job_id,
        status="ok" if ok else "error",
        answered_by=by if ok else None,
        latency_ms=latency,
        slo_met=slo if ok else False,
        degraded=degraded,
        error_code=code,
        confidence=conf,
    )


def test_a_blank_line_of_the_prompt_file_is_no_slo_miss():
    """Replay by line keeps the shipped file's blank line (its index is its line); the router refuses the
    empty prompt, and that refusal is not counted as the system missing its SLO."""
    from common.profiles import load_prompts

    prompts = load_prompts()
    blank = prompts.index("")
    assert len(prompts) == 5000 and prompts[blank + 1]  # the lines keep their numbers
    trace = Trace([0, 1000], [blank, blank + 1], "t", 2.0)
    jobs = [
        JobRecord(f"j{i}", index, ms, sent_s=ms / 1000, blank_prompt=not prompts[index])
        for i, (ms, index) in enumerate(zip(trace.arrivals_ms, trace.prompt_indices, strict=False))
    ]
    for job, result in zip(
        jobs, [_result("j0", ok=False, code="invalid_request"), _result("j1", "light", 50)], strict=False
    ):
        job.result, job.received_s = result, job.sent_s + 0.05
    e = report.summarize(RunRecord("p", 1.0, trace, jobs, duplicates=0), slo_ms=2500)
    assert e["blank_prompts"] == 1 and e["errors"] == {"invalid_request": 1}
    assert e["slo_violation_ratio"] == 0.0


def test_summarize_counts_every_job():
    x = 0.1
    trace = Trace([0, 1000, 2000, 3000, 4000, 9000], [0, 1, 2, 3, 4, 5], "t", 10.0)
    jobs = [JobRecord(f"j{i}", i, ms, sent_s=ms * x / 1000) for i, ms in enumerate(trace.arrivals_ms)]
    outcomes = [
        _result("j0", "light", latency=50),
        _result("j1", "heavy", latency=300, slo=False),
        _result("j2", "light", latency=100, degraded=True),
        _result("j3", ok=False, code="overloaded"),
        _result("j4", "heavy", latency=200),
        None,
    ]  # j5 is lost
    for j, r in zip(jobs, outcomes, strict=False):
        if r is not None:
            j.result, j.received_s = r, j.sent_s + r.latency_ms / 1000
    run = RunRecord("p", x, trace, jobs, duplicates=0)
    curve = QualityCurve([0.0, 1.0], [10.0, 20.0])
    e = report.summarize(run, slo_ms=2500, curve=curve, confidence_curve=load_cascade_profile("sdturbo-sdv15").curve)
    assert (e["sent"], e["answered"], e["ok"], e["lost"], e["duplicates"]) == (6, 5, 4, 1, 0)
    assert e["errors"] == {"overloaded": 1} and e["degraded"] == 1
    assert e["slo_met"] == 3 and e["slo_violation_ratio"] == pytest.approx(0.5)
    assert e["latency_ms"]["max"] == pytest.approx(3000)  # 300 ms wall at time scale 0.1
    assert e["heavy_share"] == 0.5 and e["throughput_qps"] == pytest.approx(0.4)
    # windows of 5 s: [0,5) has j0 light, j1 heavy, j2 light, j4 heavy -> share 0.5 -> 15
    assert e["quality"]["estimate"] == pytest.approx(15.0)
    assert json.dumps(e)  # serialisable
    real = report.summarize(run, slo_ms=2500, backend="tiny")
    assert real["quality"]["heavy_share"] == 0.5 and real["quality"]["mean_light_confidence"] == pytest.approx(0.8)


@pytest.mark.slow
def test_replay_two_policies_against_real_stacks(tmp_path):
    """A time-scaled replay (20x) of a bursty trace against two fresh stacks, with recorded
    confidences replayed by the profiled discriminator; every job accounted for."""
    from loadtest.cli import main

    trace = generate("step", rate=5, low_rate=2, duration_s=90, seed=7, n_prompts=300)
    trace_file = tmp_path / "trace.csv"
    write_trace(trace, trace_file)
    # Recorded confidences: prompts of even length confident, odd ones not (so the threshold splits
    # them); keyed by text, because the DiffusionDB file holds some prompts twice.
    prompts = load_prompts()
    confidences = {i: (0.9 if len(prompts[i]) % 2 == 0 else 0.05) for i in range(300)}
    conf_file = tmp_path / "conf.csv"
    conf_file.write_text("prompt_index,confidence\n" + "".join(f"{i},{c}\n" for i, c in confidences.items()))
    # Two controller policies and, for comparison, fixed roles without a controller.
    policies = ["diffserve", "clipper-light", "none"] if HAS_CONTROLLER else ["none"]
    curve = load_cascade_profile("sdturbo-sdv15").quality
    out = tmp_path / "out"
    main(
        [
            "--trace-file",
            str(trace_file),
            "--time-scale",
            "0.05",
            "--workers",
            "4",
            "--policies",
            ",".join(policies),
            "--backend",
            "profiled",
            "--confidence-file",
            str(conf_file),
            "--out",
            str(out),
            "--no-progress",
            "--drain-timeout-s",
            "30",
        ]
    )
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["policies"]) == policies
    assert rep["meta"]["time_scale"] == 0.05 and rep["meta"]["sent"] == len(trace)
    for policy, e in rep["policies"].items():
        assert e["sent"] == len(trace)
        assert e["answered"] + e["lost"] == e["sent"]
        assert e["lost"] == 0 and e["duplicates"] == 0 and e["unknown_results"] == 0
        assert e["ok"] + e["error_count"] == e["answered"]
        for key in ("p50", "p95", "p99"):
            assert e["latency_ms"][key] is not None and e["latency_ms"][key] > 0
        assert 0 <= e["slo_violation_ratio"] <= 1 and 0 <= e["heavy_share"] <= 1
        q = e["quality"]
        assert q["metric"] == "fid" and min(curve.scores) - 1e-6 <= q["estimate"] <= max(curve.scores) + 1e-6
        assert q["windows"] >= 10
        assert e["timeline"]["plan"], "the plan/roles were sampled"
        # Latencies are full-speed: far above the wall-clock values of a 20x replay.
        assert e["latency_ms"]["p50"] > 100
        rows = list(csv.DictReader(io.StringIO((out / "jobs" / f"{policy}.csv").read_text())))
        assert len(rows) == len(trace) and len({r["job_id"] for r in rows}) == len(rows)
        for r in rows:  # the recorded confidence of each prompt came back with its answer
            assert r["status"] == "ok", r
            assert float(r["confidence"]) == pytest.approx(confidences[int(r["prompt_index"])])
    if "clipper-light" in rep["policies"]:
        assert rep["policies"]["clipper-light"]["heavy_share"] == 0
        assert rep["policies"]["clipper-light"]["quality"]["estimate"] == pytest.approx(22.77)
    if HAS_CONTROLLER:
        assert any(s.get("threshold") is not None for s in rep["policies"]["diffserve"]["timeline"]["plan"])
    # Fixed threshold 0.5 without a controller: only the unconfident prompts (0.05) may go heavy.
    heavy = [
        r for r in csv.DictReader(io.StringIO((out / "jobs" / "none.csv").read_text())) if r["answered_by"] == "heavy"
    ]
    assert heavy and all(confidences[int(r["prompt_index"])] < 0.5 for r in heavy)
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        with Image.open(out / name) as image:
            image.verify()
    summary = (out / "summary.md").read_text()
    assert all(f"| {p} |" in summary for p in policies)


@pytest.mark.slow
def test_replay_against_a_running_deployment(tmp_path):
    """--redis-url: drive a deployment somebody else started (here a fixed-role stack whose Redis
    wants a password given apart from the URL, as REDIS_PASSWORD): the plan sampler must reach it too."""
    from common.localstack import LocalStack, RedisServer, StackSpec
    from loadtest.runner import replay

    server = RedisServer(password="s3cret").start()
    url = f"redis://127.0.0.1:{server.port}/0"  # no password in it
    trace = generate("poisson", rate=4, duration_s=30, seed=1, n_prompts=100)
    env = {"DIFFSERVE_SLO_MS": "250", "REDIS_PASSWORD": "s3cret"}
    spec = StackSpec(redis_url=url, light_workers=1, heavy_workers=1, time_scale=0.05, env=env)
    try:
        with LocalStack(spec, str(tmp_path / "logs")):
            run = asyncio.run(
                replay(
                    RedisSettings(redis_url=url, redis_password="s3cret"),
                    trace,
                    load_prompts(),
                    time_scale=0.05,
                    policy="external",
                    progress=False,
                    drain_timeout_s=20,
                    sample_interval_s=0.1,
                )
            )
    finally:
        server.stop()
    e = report.summarize(run, slo_ms=5000, curve=load_cascade_profile("sdturbo-sdv15").quality)
    assert e["sent"] == len(trace) > 50 and e["lost"] == 0 and e["duplicates"] == 0
    assert len(run.plan_samples) > 10 and all("backlog" in s for s in run.plan_samples)
    assert {s["roles"]["light"] for s in run.plan_samples if "roles" in s} == {1}
    assert all(s.get("threshold") is None for s in run.plan_samples)  # no controller, no plan


@pytest.mark.slow
@pytest.mark.parametrize("store", ["local", "localfs"])
def test_serving_bench_smoke(tmp_path, store):
    from loadtest import serving_bench

    out = tmp_path / "bench.json"
    shm = Path("/dev/shm")
    before = set(shm.glob("bench-blobs-*"))
    serving_bench.main(
        [
            "--rates",
            "40,80",
            "--step-s",
            "0.5",
            "--rtt-samples",
            "100",
            "--budget-s",
            "20",
            "--image-kb",
            "64",
            "--blob-url",
            store,
            "--out",
            str(out),
            "--log-dir",
            str(tmp_path / "logs"),
        ]
    )
    (result,) = json.loads(out.read_text())["runs"]
    assert result["image_kb"] == 64
    assert result["redis_round_trip"]["xadd_read_ack_ms"]["n"] == 100
    assert 0 < result["redis_round_trip"]["xadd_to_read_ms"]["p50"] < result["overhead_ms"]["p50"]
    assert [s["rate"] for s in result["steps"]] == [40, 80]
    assert all(s["answered"] == s["sent"] and s["errors"] == 0 for s in result["steps"])
    assert result["max_sustained_qps"] in (0, 40, 80)
    # Each job's two 64 KiB images cross the image store (written, then the answer read); the queue
    # Redis carries references only.
    for step in result["steps"]:
        assert step["queue_kb_per_job"] < 30, step
        assert step["blob_kb_per_job"] > 3 * 64 if store == "local" else step["blob_kb_per_job"] is None, step
    if store == "localfs":  # its directory goes with the run
        assert set(shm.glob("bench-blobs-*")) <= before
    assert "| bare Redis" in out.with_suffix(".md").read_text()


def test_prompt_lines_keep_their_numbers():
    prompts = load_prompts()
    assert len(prompts) == 5000  # the shipped file's every line, its one blank line included
    assert prompts[3971] == "" and prompts[3972] and prompts[4999]
    assert len(set(prompts)) < len(prompts)  # texts repeat: lines, not texts, identify a query


@pytest.mark.slow
def test_replay_is_faithful_per_line(redis_server, tmp_path):
    """A prompt file with a blank line and repeated texts: every query gets the confidence recorded
    for its own line, and the blank line is sent, answered as an empty prompt and counted."""
    from common.localstack import LocalStack, StackSpec
    from loadtest.runner import replay
    from loadtest.simulation import SimConfig, simulate

    lines = ["a cat", "", "a dog", "a cat", "a bird", "a dog"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(lines) + "\n")
    recorded = {0: 0.9, 2: 0.1, 3: 0.2, 4: 0.7, 5: 0.8}  # the same text, other confidences, by line
    conf_file = tmp_path / "conf.csv"
    conf_file.write_text("prompt_index,confidence\n" + "".join(f"{i},{c}\n" for i, c in recorded.items()))
    prompts = load_prompts(prompts_file)
    assert prompts == lines
    trace_file = tmp_path / "trace.csv"
    trace_file.write_text("arrival_ms,prompt_index\n" + "".join(f"{i * 300},{i}\n" for i in range(6)))
    trace = read_trace(trace_file, n_prompts=len(prompts))  # the last line's index is in range
    env = {"DIFFSERVE_CONFIDENCE_FILE": str(conf_file), "DIFFSERVE_THRESHOLD": "0.5", "DIFFSERVE_SLO_MS": "500"}
    spec = StackSpec(redis_url=redis_server.url, light_workers=1, heavy_workers=1, time_scale=0.1, env=env)
    with LocalStack(spec, str(tmp_path / "logs")):
        run = asyncio.run(
            replay(
                RedisSettings(redis_url=redis_server.url),
                trace,
                prompts,
                time_scale=0.1,
                policy="none",
                progress=False,
                drain_timeout_s=30,
                sample_interval_s=0.1,
            )
        )
    by_line = {j.prompt_index: j.result for j in run.jobs}
    assert by_line[1].status == "error" and by_line[1].error_code == "invalid_request"
    for i, confidence in recorded.items():
        assert by_line[i].status == "ok" and by_line[i].confidence == pytest.approx(confidence)
        assert by_line[i].answered_by == ("light" if confidence >= 0.5 else "heavy")
    e = report.summarize(run, slo_ms=5000)
    assert e["blank_prompts"] == 1 and e["errors"] == {"invalid_request": 1} and e["lost"] == 0
    # the simulator reads the same file the same way
    from common.backends.profiled import load_confidence_overrides
    from common.planner import FixedPlan

    sim = simulate(
        load_cascade_profile("sdturbo-sdv15"),
        trace,
        prompts,
        SimConfig(policy="static", workers=2, slo_ms=5000, fixed_plan=FixedPlan.parse("t=0.5,light=1x4,heavy=1x2")),
        overrides=load_confidence_overrides(str(conf_file)),
    )
    assert {j.prompt_index: j.result.confidence for j in sim.jobs if j.result.status == "ok"} == pytest.approx(recorded)


@pytest.mark.slow
def test_gateway_bench_smoke(tmp_path):
    from loadtest import gateway_bench

    out = tmp_path / "gateway.json"
    gateway_bench.main(
        [
            "--requests",
            "20",
            "--seconds",
            "1",
            "--concurrency",
            "4",
            "--out",
            str(out),
            "--log-dir",
            str(tmp_path / "logs"),
        ]
    )
    result = json.loads(out.read_text())
    for name in ("direct client", "gateway sync", "gateway stream"):
        assert result[name]["sequential_ms"]["n"] == 20 and result[name]["requests"] > 0
    assert set(result["gateway sync"]["added_ms"]) == {"p50", "p99"}
    assert result["gateway sync"]["gateway_cpu_ms_per_request"] > 0
    assert "| gateway stream |" in out.with_suffix(".md").read_text()
