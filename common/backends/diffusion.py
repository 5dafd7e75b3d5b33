"""Real text-to-image pipelines through diffusers, and the timm discriminator.

The ``diffusers`` and ``tiny`` backends both run this code: only where the weights
come from differs (hub id / local folder vs. tiny random-weight folders).

On CUDA a model can run in *graph mode*: when it loads, the UNet step (and, for
few-step models, the VAE decode) is captured once per batch size of its pad grid as a
CUDA graph with static input buffers; a batch is padded up to the nearest captured
size and the padded rows are dropped. Small batches are launch-bound in eager mode,
so replaying one graph per step roughly halves their latency on an H100
(``common/data/h100/README.md``). On a CPU the model runs eager (logged once).

Here: the pipeline (load, park in host memory, free, generate). Beside it: ``devices``,
``host_memory`` (the weights' host copy), ``cuda_graphs`` (graph mode) and ``discriminator``
(the timm discriminator).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from common.backends import StepCallback
from common.backends.cuda_graphs import GRAPH_GRID, GRAPH_VAE_MAX_STEPS, CudaGraphs
from common.backends.devices import resolve_device
from common.backends.host_memory import HOST_RESERVE_BYTES, available_host_bytes, module_bytes, move_modules
from common.cascades import ModelSpec

log = logging.getLogger(__name__)


TINY_RESOLUTION = 64
TINY_MAX_STEPS = 4  # the tiny heavy model runs a few steps, not 50: CPU tests stay fast


def tiny_spec(spec: ModelSpec, model_dir: str) -> ModelSpec:
    return replace(
        spec,
        hub_id=str(Path(model_dir) / spec.name),
        resolution=TINY_RESOLUTION,
        steps=min(spec.steps, TINY_MAX_STEPS),
        unet_repo=None,
        unet_file=None,
    )


def local_spec(spec: ModelSpec, model_dir: str | None) -> ModelSpec:
    """Use ``model_dir/<name>`` when it exists (pre-downloaded or saved pipelines)."""
    if model_dir and (Path(model_dir) / spec.name).is_dir():
        return replace(spec, hub_id=str(Path(model_dir) / spec.name))
    return spec


def pad_to_grid(n: int, grid: tuple[int, ...]) -> int:
    """Smallest grid size that holds n rows (n itself when larger than the grid)."""
    return next((b for b in sorted(grid) if b >= n), n)


class DiffusersModel:
    """One text-to-image pipeline, loadable, offloadable to host memory, and freeable.

    ``pad_grid``: batch sizes a batch is padded up to (graph mode captures these);
    ``cuda_graphs``: graph mode (CUDA only, else eager with a log line);
    ``pin_host_memory``: keep offloaded weights in pinned host memory (None: auto, on CUDA
    when host memory allows; BackendSettings.pin_host_memory);
    ``graph_vae``: capture the VAE decode too (None: for models of at most 4 steps);
    ``pipeline_factory``: builds the pipeline instead of ``from_pretrained`` (random weights).
    """

    backend = "diffusers"

    def __init__(
        self,
        spec: ModelSpec,
        role: str,
        device: str = "auto",
        *,
        pad_grid: tuple[int, ...] = (),
        cuda_graphs: bool = False,
        pin_host_memory: bool | None = None,
        graph_vae: bool | None = None,
        pipeline_factory: Callable[[], Any] | None = None,
    ):
        self.spec, self.role, self.name = spec, role, spec.name
        self.device = resolve_device(device)
        self.cuda_graphs = cuda_graphs and self.device.startswith("cuda")
        if cuda_graphs and not self.cuda_graphs:
            log.info("CUDA graphs need a CUDA device; running eager", extra={"model": self.name, "device": self.device})
        self.pad_grid = tuple(pad_grid) or (GRAPH_GRID if self.cuda_graphs else ())
        self.pin_host_memory = pin_host_memory
        self.graph_vae = spec.steps <= GRAPH_VAE_MAX_STEPS if graph_vae is None else graph_vae
        self.pipeline_factory = pipeline_factory
        self.pipe: Any = None
        self.graphs: CudaGraphs | None = None
        self._on_host = False
        self._pinned = False
        self._host_buffer: Any = None  # flat host copy of the weights, kept for the next offload (CUDA)
        self.last_load_s = 0.0
        self.last_capture_s = 0.0

    def _dtype(self) -> Any:
        import torch

        return getattr(torch, self.spec.dtype) if self.device.startswith("cuda") else torch.float32

    def load(self, source: str = "disk") -> float:
        """Load (or bring back from host memory) onto the device, then capture the CUDA
        graphs in graph mode; returns the seconds taken, capture included."""
        start = time.perf_counter()
        if self.pipe is not None and self._on_host:
            if self.device.startswith("cuda"):  # the host buffer stays allocated for the next offload
                move_modules(self.pipe, self.device, pin=self._pinned)
            else:
                self.pipe.to(self.device)
            self._on_host = self._pinned = False
        elif self.pipe is None:
            self.pipe = self._from_pretrained(self.device)
        if self.cuda_graphs and self.graphs is None:
            self.capture()
        self.last_load_s = time.perf_counter() - start
        return self.last_load_s

    def stage(self) -> float:
        """Read the pipeline from disk into host memory without touching the device (a worker does this for
        the other role's model while it serves): a later ``load("host")`` is a copy.  Returns the seconds."""
        start = time.perf_counter()
        if self.pipe is None:
            self.pipe = self._from_pretrained("cpu")
            self.offload()  # parked as a switch parks it: on CUDA one flat (pinned) buffer, the fastest to copy
        return time.perf_counter() - start

    def _from_pretrained(self, device: str) -> Any:
        from diffusers import AutoPipelineForText2Image, DDIMScheduler, EulerDiscreteScheduler

        if self.pipeline_factory is not None:
            pipe = self.pipeline_factory()
        else:
            pipe = AutoPipelineForText2Image.from_pretrained(self.spec.hub_id, dtype=self._dtype())
        if self.spec.unet_repo:  # a distilled UNet on the base pipeline (SDXL-Lightning)
            from huggingface_hub import hf_hub_download
            from safetensors.torch import load_file

            if not self.spec.unet_file:
                raise ValueError(f"model {self.name}: unet_repo without unet_file")
            pipe.unet.load_state_dict(load_file(hf_hub_download(self.spec.unet_repo, self.spec.unet_file)))
        if self.spec.scheduler == "euler_trailing":
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        elif self.spec.scheduler == "ddim":
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        # the pipeline warns with the truncated prompt text on every long prompt: keep prompts out of logs
        logging.getLogger(type(pipe).__module__).setLevel(logging.ERROR)
        return pipe.to(device)

    def capture(self) -> float:
        """Capture the UNet step (and VAE decode) for every pad-grid batch size. A size
        that fails to capture (e.g. out of memory) stays eager. Returns seconds taken."""
        import torch

        from common import metrics

        start = time.perf_counter()
        pipe = self.pipe
        self.graphs = CudaGraphs(pipe, self.device)
        scale = getattr(pipe, "vae_scale_factor", 8)
        latent = self.spec.resolution // scale
        cfg = 2 if self.spec.guidance > 1 and pipe.unet.config.get("time_cond_proj_dim") is None else 1
        seq_len = pipe.tokenizer.model_max_length
        captured = []
        with torch.inference_mode():
            for batch in self.pad_grid:
                try:
                    self.graphs.capture_unet(batch * cfg, latent, latent, seq_len)
                    if self.graph_vae:
                        self.graphs.capture_vae(batch, latent, latent)
                    captured.append(batch)
                except Exception as exc:  # keep serving eager at this size
                    log.warning(
                        "CUDA graph capture failed; this batch size runs eager (in part)",
                        extra={"model": self.name, "batch": batch, "error": f"{type(exc).__name__}: {exc}"},
                    )
                    torch.cuda.synchronize()
        self.last_capture_s = time.perf_counter() - start
        metrics.MODEL_LOAD.labels(self.name, "capture").observe(self.last_capture_s)
        log.info(
            "CUDA graphs captured",
            extra={
                "model": self.name,
                "batches": captured,
                "vae": self.graph_vae,
                "seconds": round(self.last_capture_s, 3),
            },
        )
        return self.last_capture_s

    def _release_graphs(self) -> None:
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    def _want_pin(self) -> bool:
        if not self.device.startswith("cuda") or self.pin_host_memory is False:
            return False
        if self._host_buffer is not None and self._host_buffer.is_pinned():
            return True  # already allocated
        if self.pin_host_memory is None:
            need, free = module_bytes(self.pipe), available_host_bytes()
            if free is not None and free < need + HOST_RESERVE_BYTES:
                log.info(
                    "host memory is short; offloading to pageable memory",
                    extra={"model": self.name, "need_bytes": need, "available_bytes": free},
                )
                return False
        return True

    def offload(self) -> None:
        """Move the pipeline to host memory (pinned where possible), kept for a fast switch
        back. The CUDA graphs point at device memory, so they are dropped and recaptured."""
        if self.pipe is not None and not self._on_host:
            self._release_graphs()
            pin = self._want_pin()
            if self.device.startswith("cuda"):
                try:
                    self._host_buffer = move_modules(self.pipe, "cpu", pin=pin, buffer=self._host_buffer)
                except RuntimeError as exc:  # pinning can fail (locked-memory limits): fall back
                    if not pin:
                        raise
                    log.warning(
                        "pinned offload failed; using pageable memory", extra={"model": self.name, "error": str(exc)}
                    )
                    pin = False
                    self._host_buffer = move_modules(self.pipe, "cpu", pin=False)
            else:
                self.pipe.to("cpu")
            self._on_host, self._pinned = True, pin
            self._empty_cache()

    def unload(self) -> None:
        """Free the pipeline (device and host copies) and return the memory to the device."""
        self._release_graphs()
        self.pipe = None
        self._host_buffer = None
        self._on_host = self._pinned = False
        gc.collect()
        self._empty_cache(host=True)

    def _empty_cache(self, host: bool = False) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
            if host and hasattr(torch, "accelerator") and hasattr(torch.accelerator, "empty_host_cache"):
                torch.accelerator.empty_host_cache()  # cached pinned host memory too

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        negative_prompts: Sequence[str | None] | None = None,
        on_step: StepCallback | None = None,
    ) -> list[Image.Image]:
        """One image per prompt. With a pad grid, the batch is padded up to the next grid size
        (repeating the last row) and the padded rows are dropped: every row has its own
        generator, so an image does not depend on what it was batched with.  ``on_step`` runs
        after each denoising step (diffusers' ``callback_on_step_end``); an Interrupted it raises
        stops the batch there."""
        import torch

        n = len(prompts)
        size = pad_to_grid(n, self.pad_grid) if self.pad_grid else n
        prompts = list(prompts) + [prompts[-1]] * (size - n)
        seeds = list(seeds) + [seeds[-1]] * (size - n)
        negatives: list[str] | None = None
        if negative_prompts is not None and any(negative_prompts):
            negatives = [text or "" for text in negative_prompts]  # "" is what diffusers uses for none
            negatives += [negatives[-1]] * (size - n)
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        steps = self.spec.steps
        extra: dict[str, Any] = {}
        if on_step is not None:

            def step_end(_pipe: Any, index: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                on_step(index + 1, steps)
                return tensors

            extra["callback_on_step_end"] = step_end
        with torch.inference_mode():
            images: list[Image.Image] = self.pipe(
                prompt=prompts,
                negative_prompt=negatives,
                num_inference_steps=steps,
                guidance_scale=self.spec.guidance,
                height=self.spec.resolution,
                width=self.spec.resolution,
                generator=generators,
                output_type="pil",
                **extra,
            ).images
        return images[:n]
