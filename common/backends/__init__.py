"""Model backends, chosen per service with ``--backend``:

- ``diffusers``: the real pipelines (hub id or local folder) and the timm discriminator;
- ``tiny``: the same code on tiny random-weight models built by ``diffserve make-tiny-models``;
- ``profiled``: sleeps for the profiled batch latency and draws confidences from f(t),
  so a whole cluster runs at GPU-like timing on a CPU box (it renders no real image).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from common.config import CascadeSettings, Settings, option
from common.profiles import DEFAULT_HARDWARE

if TYPE_CHECKING:
    from PIL import Image

    from common.imaging import PngImage
    from common.profiles import CascadeProfile

BACKENDS = ("diffusers", "tiny", "profiled")
# What the `models` extra installs; the control plane and the profiled backend run without it.
MODEL_PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "timm")


# Called by a model after each denoising step with (step, steps); it may raise Interrupted.
StepCallback = Callable[[int, int], None]


class Interrupted(Exception):
    """Raised by a StepCallback to stop a batch between denoising steps (every job in it was cancelled)."""

    def __init__(self, step: int, steps: int):
        super().__init__(f"stopped after step {step} of {steps}")
        self.step, self.steps = step, steps


class ImageModel(Protocol):
    """What a worker calls on its light or heavy model, whatever the backend."""

    name: str

    def load(self, source: str = "disk") -> float:
        """Onto the device from disk or from host memory; returns the seconds it took."""
        ...

    def offload(self) -> None:
        """Park in host memory (a later ``load("host")`` is fast)."""
        ...

    def stage(self) -> float:
        """From disk into host memory only, not onto the device (a later ``load("host")`` is fast); returns
        the seconds it took."""
        ...

    def unload(self) -> None: ...

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        negative_prompts: Sequence[str | None] | None = None,
        on_step: StepCallback | None = None,
    ) -> Sequence[Image.Image | PngImage]:
        """One image per prompt, in order (a PIL image, or PNG bytes a model made itself);
        ``on_step(step, steps)`` after each denoising step."""
        ...


class DiscriminatorModel(Protocol):
    """What the discriminator service calls on its model."""

    def load(self) -> float:
        """Onto the device; returns the seconds it took."""
        ...

    def score(
        self,
        prompts: list[str],
        images: Sequence[Image.Image | None],
        prompt_indices: list[int | None] | None = None,
    ) -> list[float]:
        """Confidence per light image (None where the backend takes no image: profiled)."""
        ...


@dataclass(kw_only=True)
class BackendSettings(CascadeSettings):
    """Which models run, on what, with which profile (the cascade's, from ``CascadeSettings``)."""

    backend: str = option("profiled", "model backend", env="DIFFSERVE_BACKEND", choices=BACKENDS)
    hardware: str = option(
        "auto",
        "shipped profile set: a100 (the paper's), h100 (ours), or auto: h100 on an H100, else a100",
        env="DIFFSERVE_HARDWARE",
        choices=("auto", "a100", "h100"),
    )
    latency_file: str | None = option(
        None, "own batch-latency table (diffserve profile output)", env="DIFFSERVE_LATENCY_FILE"
    )
    curve_file: str | None = option(None, "own f(t) curve (diffserve calibrate output)", env="DIFFSERVE_CURVE_FILE")
    time_scale: float = option(
        1.0, "profiled backend: multiply every sleep by this (0.1 = 10x faster)", env="DIFFSERVE_TIME_SCALE"
    )
    model_dir: str | None = option(
        None,
        "tiny: folder from make-tiny-models; diffusers: folder of local "
        "pipelines named like the models (else the hub id)",
        env="DIFFSERVE_MODEL_DIR",
    )
    discriminator_checkpoint: str | None = option(
        None, "discriminator checkpoint folder (diffusers backend)", env="DIFFSERVE_DISCRIMINATOR_CHECKPOINT"
    )
    device: str = option("auto", "torch device: auto, cpu, cuda, cuda:N", env="DIFFSERVE_DEVICE")
    host_cache: bool = option(
        True, "keep the idle pipeline in host memory for fast role switches", env="DIFFSERVE_HOST_CACHE"
    )
    stage_other_role: bool = option(
        True,
        "with --host-cache: at start, also read the other role's model into host memory (in the background), "
        "so the first role switch, often a burst's, is a copy from host memory rather than a load from disk",
        env="DIFFSERVE_STAGE_OTHER_ROLE",
    )
    batch_grid: list[int] = option(
        [1, 2, 4, 8, 16, 32], "batch sizes the planner chooses from and graph mode captures", env="DIFFSERVE_BATCH_GRID"
    )
    cuda_graphs: bool = option(
        True, "capture a CUDA graph of the UNet step per batch size (CUDA only)", env="DIFFSERVE_CUDA_GRAPHS"
    )
    pin_host_memory: bool | None = option(
        None,
        "keep a parked pipeline in pinned host memory (on, off; auto: on CUDA while host memory allows)",
        env="DIFFSERVE_PIN_HOST_MEMORY",
    )
    confidence_file: str | None = option(
        None,
        "profiled discriminator: recorded `prompt_index,confidence` lines "
        "(a job carrying a prompt_index gets its line's confidence)",
        env="DIFFSERVE_CONFIDENCE_FILE",
    )
    image_kb: int = option(
        0,
        "profiled backend: every image is one PNG of this many KiB, encoded once at start, so a benchmark "
        "measures moving images, not encoding them (0: a 64x64 placeholder encoded per job)",
        env="DIFFSERVE_IMAGE_KB",
    )
    prompts_file: str | None = option(
        None,
        "prompt file the confidence file's lines are of, for jobs that carry no prompt_index (default: DiffusionDB 5k)",
        env="DIFFSERVE_PROMPTS_FILE",
    )


def require_models_extra(what: str) -> None:
    """Real-model code runs torch: without the `models` extra, stop with one line that says what to
    install instead of an ImportError deep in a model load."""
    missing = [name for name in MODEL_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"diffserve: {what} needs {', '.join(missing)}: pip install -c constraints.txt 'diffserve[models]'"
        )


def require_backend(backend: str) -> None:
    if backend != "profiled":
        require_models_extra(f"--backend {backend}")


@dataclass(kw_only=True)
class SloSettings(Settings):
    """The latency SLO the router stamps as each job's deadline and the controller plans for."""

    slo_ms: float | None = option(
        None,
        "SLO in wall-clock ms, as the router stamps deadlines (default: the cascade's, x time_scale on the "
        "profiled backend)",
        env="DIFFSERVE_SLO_MS",
    )


def effective_slo_ms(settings: BackendSettings, given: float | None) -> float:
    """The one SLO rule every service uses: DIFFSERVE_SLO_MS means the wall-clock budget the router stamps
    as the deadline; unset, the cascade's SLO in this deployment's clock (only the default is scaled)."""
    from common.cascades import cascade

    return given or cascade(settings.cascade).slo_ms * latency_scale(settings)


def latency_scale(settings: BackendSettings) -> float:
    """Factor from profiled latencies to this deployment's clock: the profiled backend runs at
    ``time_scale``; real models run at the profile's own speed."""
    return settings.time_scale if settings.backend == "profiled" else 1.0


def resolve_hardware(settings: BackendSettings) -> str:
    """``auto``: the H100 table on an H100 (real models), else the paper's A100 tables."""
    if settings.hardware != "auto":
        return settings.hardware
    if settings.backend == "profiled":
        return DEFAULT_HARDWARE
    require_backend(settings.backend)
    from common.backends.devices import detect_hardware

    return detect_hardware(settings.device)


def load_profile(settings: BackendSettings) -> CascadeProfile:
    from common.profiles import load_cascade_profile

    return load_cascade_profile(
        settings.cascade, resolve_hardware(settings), latency_file=settings.latency_file, curve_file=settings.curve_file
    )


def make_model(settings: BackendSettings, role: str) -> ImageModel:
    """The light or heavy model of the configured cascade on the configured backend (not loaded yet)."""
    from common.cascades import MODELS, cascade

    name: str = getattr(cascade(settings.cascade), role)
    if settings.backend == "profiled":
        from common.backends.profiled import ProfiledModel

        spec = MODELS[name]
        table = load_profile(settings).table(role)
        return ProfiledModel(name, role, table, settings.time_scale, spec.resolution, spec.steps, settings.image_kb)
    require_backend(settings.backend)
    from common.backends.devices import resolve_device
    from common.backends.diffusion import DiffusersModel, local_spec, tiny_spec

    spec = MODELS[name]
    if settings.backend == "tiny":
        if not settings.model_dir:
            raise ValueError("the tiny backend needs --model-dir (made by `diffserve make-tiny-models DIR`)")
        spec = tiny_spec(spec, settings.model_dir)
    else:
        spec = local_spec(spec, settings.model_dir)
    # Graph mode replays one captured graph per grid size: partial batches are padded up to one.
    graphs = settings.cuda_graphs and resolve_device(settings.device).startswith("cuda")
    return DiffusersModel(
        spec,
        role,
        settings.device,
        pad_grid=tuple(settings.batch_grid) if graphs else (),
        cuda_graphs=settings.cuda_graphs,
        pin_host_memory=settings.pin_host_memory,
    )


def make_discriminator(settings: BackendSettings) -> DiscriminatorModel:
    if settings.backend == "profiled":
        from common.backends.profiled import ProfiledDiscriminator, confidences_by_text, load_confidence_overrides
        from common.profiles import load_prompts

        overrides = load_confidence_overrides(settings.confidence_file) if settings.confidence_file else {}
        by_text = confidences_by_text(overrides, load_prompts(settings.prompts_file)) if overrides else {}
        profile = load_profile(settings)
        return ProfiledDiscriminator(profile.discriminator, profile.curve, settings.time_scale, overrides, by_text)
    require_backend(settings.backend)
    from pathlib import Path

    from common.backends.discriminator import TimmDiscriminator

    checkpoint = settings.discriminator_checkpoint
    if not checkpoint and settings.model_dir:
        checkpoint = str(Path(settings.model_dir) / "discriminator")
    if not checkpoint:
        raise ValueError("the discriminator needs --discriminator-checkpoint (see `diffserve train-discriminator`)")
    return TimmDiscriminator(checkpoint, settings.device)
