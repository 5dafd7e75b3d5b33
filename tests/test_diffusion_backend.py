"""DiffusersModel on tiny random-weight models (CPU): batch padding, host-memory switches,
graph mode's CPU fallback, the graph replay plumbing (with a stand-in for the CUDA graph),
and the timm discriminator."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common.backends import cuda_graphs, devices, host_memory  # noqa: E402
from common.backends.diffusion import DiffusersModel, pad_to_grid, tiny_spec  # noqa: E402
from common.backends.discriminator import TimmDiscriminator  # noqa: E402
from common.cascades import MODELS  # noqa: E402

PROMPTS = ["a red fox in the snow", "an oil painting of a lighthouse", "a bowl of ramen, studio light"]
SEEDS = [11, 22, 33]
TOL = 3  # pixel levels: a batch of different size may sum in another order


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from common.backends.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.getbasetemp() / "tiny_models")


def _model(tiny_dir, name="sdturbo", **kwargs) -> DiffusersModel:
    role = "light" if name == "sdturbo" else "heavy"
    return DiffusersModel(tiny_spec(MODELS[name], str(tiny_dir)), role, "cpu", **kwargs)


def _arrays(images) -> np.ndarray:
    return np.stack([np.asarray(img, dtype=np.int16) for img in images])


def _rows_seen(model) -> list[int]:
    """Record the UNet's batch rows on each call."""
    rows = []
    forward = model.pipe.unet.forward

    def spy(sample, *args, **kwargs):
        rows.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    model.pipe.unet.forward = spy
    return rows


def test_pad_to_grid():
    grid = (1, 2, 4, 8, 16, 32)
    assert [pad_to_grid(n, grid) for n in (1, 2, 3, 5, 9, 17, 32, 33)] == [1, 2, 4, 8, 16, 32, 32, 33]
    assert pad_to_grid(3, (8, 4)) == 4  # any order


@pytest.mark.parametrize("name", ["sdturbo", "sdv15"])
def test_padded_batch_gives_the_unpadded_images(tiny_dir, name):
    model = _model(tiny_dir, name)
    model.load()
    reference = _arrays(model.generate(PROMPTS, SEEDS))  # no pad grid: 3 rows

    model.pad_grid = (1, 2, 4, 8)
    rows = _rows_seen(model)
    images = model.generate(PROMPTS, SEEDS)
    cfg = 2 if MODELS[name].guidance > 1 else 1
    assert rows and set(rows) == {4 * cfg}  # 3 prompts ran as a batch of 4
    assert len(images) == 3
    assert np.abs(_arrays(images) - reference).max() <= TOL
    # a row does not depend on its batch: the first prompt alone gives the same image
    alone = _arrays(model.generate(PROMPTS[:1], SEEDS[:1]))
    assert np.abs(alone[0] - reference[0]).max() <= TOL
    model.unload()


def test_host_memory_switch_matches_fresh_load(tiny_dir):
    fresh = _model(tiny_dir)
    assert fresh.load("disk") > 0
    reference = _arrays(fresh.generate(PROMPTS[:2], SEEDS[:2]))
    fresh.unload()
    assert fresh.pipe is None

    model = _model(tiny_dir)
    model.load("disk")
    pipe = model.pipe
    model.offload()
    assert model._on_host and not model._pinned  # no pinning without CUDA
    seconds = model.load("host")
    assert seconds >= 0 and model.pipe is pipe and not model._on_host  # same pipeline, not reloaded
    assert np.abs(_arrays(model.generate(PROMPTS[:2], SEEDS[:2])) - reference).max() <= TOL
    model.unload()
    model.load("disk")  # a freed model loads again from disk
    assert model.pipe is not pipe
    model.unload()


def test_a_staged_model_is_read_into_host_memory_and_loads_from_there(tiny_dir):
    fresh = _model(tiny_dir)
    fresh.load("disk")
    reference = _arrays(fresh.generate(PROMPTS[:2], SEEDS[:2]))
    fresh.unload()

    model = _model(tiny_dir)
    assert model.stage() > 0
    pipe = model.pipe
    assert model._on_host and pipe.unet.device.type == "cpu"  # read from disk, parked in host memory
    model.load("host")
    assert model.pipe is pipe and not model._on_host  # the staged pipeline, not read again
    assert np.abs(_arrays(model.generate(PROMPTS[:2], SEEDS[:2])) - reference).max() <= TOL
    model.unload()


def test_flat_host_copy_keeps_the_weights(tiny_dir):
    """The offload path of CUDA (one flat host buffer, views per tensor) on CPU tensors."""
    model = _model(tiny_dir)
    model.load()
    before = _arrays(model.generate(PROMPTS[:1], SEEDS[:1]))
    params, buffers = host_memory.collect_tensors(model.pipe)
    first = params[0].data.data_ptr()
    buffer = host_memory.move_modules(model.pipe, "cpu", pin=False)
    params2, _ = host_memory.collect_tensors(model.pipe)
    assert params2[0].data.data_ptr() != first  # really copied
    base = buffer.untyped_storage().data_ptr()
    assert all(p.data.untyped_storage().data_ptr() == base for p in params2)  # one flat buffer
    assert all(b.untyped_storage().data_ptr() == base for b, _owners in host_memory.collect_tensors(model.pipe)[1])
    assert np.abs(_arrays(model.generate(PROMPTS[:1], SEEDS[:1])) - before).max() == 0
    # the next offload reuses the buffer (here: copy the weights out of it first, as a load would)
    for p in params2:
        p.data = p.data.clone()
    assert host_memory.move_modules(model.pipe, "cpu", pin=False, buffer=buffer) is buffer
    assert np.abs(_arrays(model.generate(PROMPTS[:1], SEEDS[:1])) - before).max() == 0
    assert buffers
    model.unload()


def test_graph_mode_on_cpu_falls_back_to_eager(tiny_dir, caplog):
    with caplog.at_level(logging.INFO, logger="common.backends.diffusion"):
        model = _model(tiny_dir, cuda_graphs=True)
    assert not model.cuda_graphs and model.pad_grid == ()
    assert any("CUDA graphs need a CUDA device" in r.getMessage() for r in caplog.records)
    model.load()
    assert model.graphs is None and "forward" not in model.pipe.unet.__dict__
    assert len(model.generate(PROMPTS[:1], SEEDS[:1])) == 1
    model.unload()


def test_pin_setting_is_read_by_the_config():
    from common.backends import BackendSettings

    def pin(raw: str) -> bool | None:
        return BackendSettings.from_namespace(env={"DIFFSERVE_PIN_HOST_MEMORY": raw}).pin_host_memory

    assert (pin("off"), pin("1"), pin("auto"), BackendSettings().pin_host_memory) == (False, True, None, None)


class _StandInGraph:
    """Plays a captured graph on the CPU: replay() reruns the function on the static
    inputs into the static output, which is what a CUDA graph replay amounts to."""

    def __init__(self, fn, inputs, out):
        self.fn, self.inputs, self.out, self.replays = fn, inputs, out, 0

    def replay(self):
        self.out.copy_(self.fn(*self.inputs))
        self.replays += 1


def _stand_in_capture(self, fn, static_inputs):
    out = fn(*static_inputs).clone()
    return _StandInGraph(fn, static_inputs, out), static_inputs, out


@pytest.mark.parametrize("name", ["sdturbo", "sdv15"])
def test_graph_replay_plumbing_matches_eager(tiny_dir, monkeypatch, name):
    """The CUDA path's static buffers, shape keys, padding and output handling, with the
    capture replaced by a CPU stand-in (the CUDA capture itself needs a GPU)."""
    import torch

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(cuda_graphs.CudaGraphs, "_capture", _stand_in_capture)
    model = _model(tiny_dir, name)
    model.load()
    reference = _arrays(model.generate(PROMPTS, SEEDS))
    model.pad_grid = (2, 4)
    seconds = model.capture()
    assert seconds >= 0
    cfg = 2 if MODELS[name].guidance > 1 else 1
    assert sorted(k[0][0] for k in model.graphs.unet_graphs) == [2 * cfg, 4 * cfg]
    assert sorted(k[0][0] for k in model.graphs.vae_graphs) == [2, 4]  # tiny models run <= 4 steps
    images = model.generate(PROMPTS, SEEDS)  # 3 -> padded to 4 -> replayed
    unet_graph = model.graphs.unet_graphs[next(k for k in model.graphs.unet_graphs if k[0][0] == 4 * cfg)][0]
    vae_graph = model.graphs.vae_graphs[next(k for k in model.graphs.vae_graphs if k[0][0] == 4)][0]
    assert unet_graph.replays == model.spec.steps and vae_graph.replays == 1
    assert np.abs(_arrays(images) - reference).max() <= TOL
    # a shape that was not captured runs eager (8 rows: no graph for it)
    model.pad_grid = ()
    assert len(model.generate(PROMPTS * 3, SEEDS * 3)) == 9
    # offload drops the graphs and restores the eager functions
    model.offload()
    assert model.graphs is None
    assert "forward" not in model.pipe.unet.__dict__ and "decode" not in model.pipe.vae.__dict__
    model.load("host")
    assert np.abs(_arrays(model.generate(PROMPTS, SEEDS)) - reference).max() <= TOL
    model.unload()


def test_hardware_names_on_cpu():
    assert devices.detect_hardware("cpu") == "a100"
    assert devices.device_slug("cpu") == "cpu"


def test_discriminator_scores_and_wraps_a_model(tiny_dir):
    from PIL import Image

    disc = TimmDiscriminator(str(tiny_dir / "discriminator"), "cpu")
    assert disc.load() >= 0 and not disc.half
    images = [Image.new("RGB", (64, 64), (i * 40, 80, 120)) for i in range(3)]
    scores = disc.score(["p"] * 3, images)
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    wrapped = TimmDiscriminator.from_model(disc.model, disc.meta, "cpu")
    assert wrapped.score(["p"] * 3, images) == pytest.approx(scores)


def test_progress_after_each_step_and_an_interrupt_stops_the_batch(tiny_dir):
    """The heavy model reports step i of N (diffusers' callback_on_step_end); an Interrupted raised
    there stops the batch between steps, before the rest of the denoising and the VAE decode."""
    from common.backends import Interrupted

    model = _model(tiny_dir, "sdv15")
    model.load()
    steps_seen: list[tuple[int, int]] = []
    images = model.generate(PROMPTS[:2], SEEDS[:2], on_step=lambda step, steps: steps_seen.append((step, steps)))
    n = model.spec.steps
    assert n > 1 and steps_seen == [(i, n) for i in range(1, n + 1)] and len(images) == 2

    rows = _rows_seen(model)

    def stop_after_two(step: int, steps: int) -> None:
        if step == 2:
            raise Interrupted(step, steps)

    with pytest.raises(Interrupted) as caught:
        model.generate(PROMPTS[:2], SEEDS[:2], on_step=stop_after_two)
    assert (caught.value.step, caught.value.steps) == (2, n)
    assert len(rows) == 2  # two UNet calls (both guidance halves in one batch each), then nothing


def test_negative_prompt_changes_the_image_and_none_keeps_it(tiny_dir):
    model = _model(tiny_dir, "sdv15")
    model.load()
    plain = _arrays(model.generate(PROMPTS[:1], SEEDS[:1]))
    assert np.array_equal(plain, _arrays(model.generate(PROMPTS[:1], SEEDS[:1], negative_prompts=[None])))
    negative = _arrays(model.generate(PROMPTS[:1], SEEDS[:1], negative_prompts=["blurry, low quality"]))
    assert not np.array_equal(plain, negative)
