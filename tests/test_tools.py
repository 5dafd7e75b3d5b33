"""The operator tools on tiny models (CPU): train-discriminator (and --resume), calibrate,
profile; the random-weight architectures; the GPU benchmark's CPU message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common.profiles import load_cascade_profile, load_confidence_curve, load_latency_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from common.backends.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.getbasetemp() / "tiny_models")


@pytest.fixture
def image_dir(tmp_path):
    """4 'real' (smooth gradients) and 4 'generated' (noise) images, as PNG and JPEG."""
    rng = np.random.default_rng(0)
    for folder in ("real", "generated"):
        (tmp_path / folder).mkdir()
    for i in range(4):
        ramp = np.linspace(0, 255, 40, dtype=np.uint8)
        real = np.stack(
            [np.tile(ramp, (40, 1)), np.tile(ramp[:, None], (1, 40)), np.full((40, 40), 30 * i, np.uint8)], axis=-1
        )
        Image.fromarray(real).save(tmp_path / "real" / f"r{i}.{'png' if i % 2 else 'jpg'}")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "generated" / f"g{i}.png")
    (tmp_path / "generated" / "notes.txt").write_text("not an image")  # ignored
    return tmp_path


def _train_args(data, out, *extra):
    return [
        "--data",
        str(data),
        "--out",
        str(out),
        "--arch",
        "test_efficientnet",
        "--input-size",
        "32",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--val-fraction",
        "0",
        "--quiet",
        *extra,
    ]


def test_train_discriminator_saves_a_loadable_checkpoint_and_resumes(image_dir, tmp_path):
    from safetensors.torch import load_file

    from common.backends.discriminator import TimmDiscriminator
    from tools import train_discriminator

    out = tmp_path / "ckpt"
    train_discriminator.main(_train_args(image_dir, out, "--max-steps", "1"))
    state = json.loads((out / "train_state.json").read_text())
    assert state["step"] == 1 and state["class_counts"] == {"generated": 4, "real": 4}
    meta = json.loads((out / "discriminator.json").read_text())
    assert meta["arch"] == "test_efficientnet" and meta["input_size"] == 32
    assert meta["classes"] == ["generated", "real"] and meta["positive_class"] == 1
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "discriminator.json",
        "optimizer.safetensors",
        "train_state.json",
    }  # no pickle anywhere
    moments = load_file(str(out / "optimizer.safetensors"))
    assert any(k.endswith(".exp_avg") for k in moments)

    disc = TimmDiscriminator(str(out), "cpu")
    disc.load()
    images = [Image.open(p) for p in sorted((image_dir / "real").iterdir())[:2]]
    scores = disc.score(["a", "b"], images)
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)

    weights_1 = load_file(str(out / "model.safetensors"))
    train_discriminator.main(_train_args(image_dir, out, "--max-steps", "2", "--resume"))
    state = json.loads((out / "train_state.json").read_text())
    assert state["step"] == 2
    weights_2 = load_file(str(out / "model.safetensors"))
    assert any(not (weights_1[k] == weights_2[k]).all() for k in weights_1 if weights_1[k].is_floating_point())
    steps = load_file(str(out / "optimizer.safetensors"))
    step_keys = [k for k in steps if k.endswith(".step")]
    assert step_keys and all(float(steps[k]) == 2.0 for k in step_keys)  # AdamW continued, not restarted
    # resuming at the target step does nothing
    train_discriminator.main(_train_args(image_dir, out, "--max-steps", "2", "--resume"))
    assert json.loads((out / "train_state.json").read_text())["step"] == 2


def test_train_discriminator_needs_both_classes(tmp_path):
    from tools import train_discriminator

    (tmp_path / "real").mkdir()
    (tmp_path / "generated").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "real" / "a.png")
    with pytest.raises(SystemExit):
        train_discriminator.main(_train_args(tmp_path, tmp_path / "out", "--max-steps", "1"))


def test_curve_from_confidences():
    from tools.calibrate import curve_from_confidences, histogram

    curve = curve_from_confidences([0.0, 0.1, 0.3, 0.3, 0.99, 1.0])
    assert len(curve.ts) == 21 and curve.ts[1] == 0.05 and curve.ts[-1] == 1.0
    assert curve.fs[0] == 0.0 and curve.fs[-1] == 1.0
    assert curve.f(0.05) == pytest.approx(1 / 6)  # only 0.0 is below 0.05
    assert curve.f(0.35) == pytest.approx(4 / 6)
    rows = histogram([0.0, 0.1, 0.3, 0.3, 0.99, 1.0], bins=10)
    assert [r[2] for r in rows] == [1, 1, 0, 2, 0, 0, 0, 0, 0, 2]


def test_calibrate_writes_a_monotone_curve(tiny_dir, tmp_path):
    from common.backends.profiled import load_confidence_overrides
    from tools import calibrate

    out, hist, conf = tmp_path / "f_t.csv", tmp_path / "hist.csv", tmp_path / "conf.csv"
    calibrate.main(
        [
            "--backend",
            "tiny",
            "--model-dir",
            str(tiny_dir),
            "--cascade",
            "sdturbo-sdv15",
            "--limit",
            "20",
            "--batch-size",
            "10",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--hist",
            str(hist),
            "--confidence-out",
            str(conf),
            "--quiet",
        ]
    )
    curve = load_confidence_curve(out)
    assert curve.ts[0] == 0.0 and curve.ts[-1] == 1.0 and len(curve.ts) == 21
    assert curve.fs[0] == 0.0 and curve.fs[-1] == 1.0
    assert all(a <= b for a, b in zip(curve.fs, curve.fs[1:], strict=False))
    counts = [int(line.split(",")[2]) for line in hist.read_text().splitlines()[1:]]
    assert sum(counts) == 20 and len(counts) == 20
    lines = conf.read_text().splitlines()
    assert lines[0] == "prompt_index,confidence" and len(lines) == 21
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(20))
    confidences = [float(line.split(",")[1]) for line in lines[1:]]
    # f(t) is the share of these confidences below t
    assert curve.f(0.5) == pytest.approx(sum(c < 0.5 for c in confidences) / 20, abs=1e-6)
    overrides = load_confidence_overrides(str(conf))  # what the profiled discriminator replays, by line
    assert [overrides[i] for i in range(20)] == pytest.approx(confidences)


def test_profile_tiny_writes_a_readable_table(tiny_dir, tmp_path):
    from tools import profile

    out = tmp_path / "table.csv"
    profile.main(
        [
            "--backend",
            "tiny",
            "--model-dir",
            str(tiny_dir),
            "--cascade",
            "sdturbo-sdv15",
            "--batches",
            "1,2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--mode",
            "both",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    for model in ("sdturbo", "sdv15", "test_efficientnet"):
        table = load_latency_table(out, model, "cpu_fp32_eager")  # graph mode is skipped without CUDA
        assert table.batches() == [1, 2] and all(ms > 0 for ms in table.batch_ms.values())
    profile_ = load_cascade_profile("sdturbo-sdv15", latency_file=str(out))
    assert profile_.light.model == "sdturbo" and profile_.heavy.batches() == [1, 2]


def test_time_batches_marks_out_of_memory():
    from common.profiles import DOES_NOT_FIT_MS
    from tools.profile import time_batches

    def run(b, r):
        if b >= 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")

    ms = time_batches(run, [1, 2, 4, 8], repeats=1, warmup=0, progress=False)
    assert ms[1] < DOES_NOT_FIT_MS and ms[4] == DOES_NOT_FIT_MS and ms[8] == DOES_NOT_FIT_MS


def test_random_weight_architectures_match_the_published_sizes():
    from tools.profile import PARAMETER_COUNTS, build_random_components

    for name, counts in PARAMETER_COUNTS.items():
        components = build_random_components(name, "meta")
        assert tuple(sum(p.numel() for p in m.parameters()) for m in components) == counts, name
    with pytest.raises(ValueError):
        build_random_components("sdxl", "meta")


def test_accel_names():
    from tools.profile import accel_name, discriminator_row

    assert accel_name("cpu", "eager") == "cpu_fp32_eager"
    assert discriminator_row("tf_efficientnetv2_s") == "efficientnetv2_s"


def test_gpu_benchmark_says_no_cuda_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the benchmark would run")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0 and "no CUDA device" in result.stdout


@pytest.mark.slow
def test_tiny_stack_serves_with_a_trained_discriminator_from_its_checkpoint(
    image_dir, tiny_dir, redis_server, tmp_path
):
    """Train a tiny discriminator, then serve with it: every light image is scored by that checkpoint
    (the confidences equal scoring the same light images locally through the same path)."""
    import asyncio

    from common.backends.diffusion import DiffusersModel, tiny_spec
    from common.backends.discriminator import TimmDiscriminator
    from common.cascades import MODELS
    from common.imaging import from_thumbnail, thumbnail_rgb
    from common.localstack import LocalStack, StackSpec
    from tools import train_discriminator

    ckpt = tmp_path / "ckpt"
    train_discriminator.main(_train_args(image_dir, ckpt, "--max-steps", "2"))
    prompts, seeds = ["a red kite", "a stone bridge", "an orchard in fog"], [11, 12, 13]
    spec = StackSpec(
        redis_url=redis_server.url,
        backend="tiny",
        model_dir=str(tiny_dir),
        light_workers=1,
        heavy_workers=1,
        env={"DIFFSERVE_DISCRIMINATOR_CHECKPOINT": str(ckpt)},
    )
    with LocalStack(spec, str(tmp_path / "logs")):
        results = asyncio.run(_submit_seeded(redis_server.url, prompts, seeds))
    light = DiffusersModel(tiny_spec(MODELS["sdturbo"], str(tiny_dir)), "light", "cpu")
    light.load()
    disc = TimmDiscriminator(str(ckpt), "cpu")
    disc.load()
    images = [from_thumbnail(thumbnail_rgb(img, 224), 224) for img in light.generate(prompts, seeds)]
    expected = disc.score(prompts, images)
    assert [r.status for r in results] == ["ok"] * 3
    assert [round(r.confidence, 4) for r in results] == [round(c, 4) for c in expected]


async def _submit_seeded(redis_url, prompts, seeds):
    from common.client import Client

    async with Client(redis_url=redis_url) as client:
        return [await client.submit(p, seed=s, timeout=120) for p, s in zip(prompts, seeds, strict=False)]
