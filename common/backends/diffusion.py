"""Real text-to-image pipelines through diffusers, and the timm discriminator.

The ``diffusers`` and ``tiny`` backends both run this code: only where the weights
come from differs (hub id / local folder vs. tiny random-weight folders).

On CUDA a model can run in *graph mode*: when it loads, the UNet step (and, for
few-step models, the VAE decode) is captured once per batch size of its pad grid as a
CUDA graph with static input buffers; a batch is padded up to the nearest captured
size and the padded rows are dropped. Small batches are launch-bound in eager mode,
so replaying one graph per step roughly halves their latency on an H100
(``common/data/h100/README.md``). On a CPU the model runs eager (logged once).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import time
from dataclasses import replace
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, Self

from PIL import Image

from common.backends import StepCallback
from common.cascades import ModelSpec

log = logging.getLogger(__name__)

TINY_RESOLUTION = 64
TINY_MAX_STEPS = 4  # the tiny heavy model runs a few steps, not 50: CPU tests stay fast
DISCRIMINATOR_CONFIG = "discriminator.json"
DISCRIMINATOR_WEIGHTS = "model.safetensors"
GRAPH_GRID = (1, 2, 4, 8, 16, 32)  # batch sizes captured when graph mode has no pad grid of its own
GRAPH_VAE_MAX_STEPS = 4  # capture the VAE decode too for models this few steps (where it is a large share)
PIN_ENV = "DIFFSERVE_PIN_HOST_MEMORY"  # auto (default), 1/on, 0/off
HOST_RESERVE_BYTES = 4 << 30  # leave this much host memory free when deciding to pin


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def device_slug(device: str = "auto") -> str:
    """Short accelerator name for profile labels: h100, a100, l4, ..., or cpu."""
    import torch

    device = resolve_device(device)
    if not device.startswith("cuda"):
        return device.split(":")[0]
    name = torch.cuda.get_device_name(torch.device(device)).lower()
    known = re.search(r"\b(h200|h100|gh200|b200|b100|a100|a10g|a10|l40s|l40|l4|v100|t4|a6000|rtx ?\d{4})\b", name)
    if known:
        return known.group(1).replace(" ", "")
    return re.sub(r"[^a-z0-9]+", "", name.replace("nvidia", "")) or "cuda"


def detect_hardware(device: str = "auto") -> str:
    """The shipped profile set that fits this device: 'h100' on an H100, else 'a100' (the paper's)."""
    import torch

    device = resolve_device(device)
    if device.startswith("cuda") and torch.cuda.is_available():
        if "h100" in torch.cuda.get_device_name(torch.device(device)).lower():
            return "h100"
    return "a100"


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


def _pin_setting(value: bool | None) -> bool | None:
    if value is not None:
        return value
    raw = os.environ.get(PIN_ENV, "auto").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    return None


def _available_host_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# torch and diffusers objects are typed Any (see pyproject.toml): the pipeline, its modules, tensors.
def _modules(pipe: Any) -> list[Any]:
    import torch

    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]


def _module_bytes(pipe: Any) -> int:
    total = 0
    for module in _modules(pipe):
        total += sum(t.numel() * t.element_size() for t in module.parameters())
        total += sum(t.numel() * t.element_size() for t in module.buffers())
    return total


def _collect_tensors(pipe: Any) -> tuple[list[Any], list[tuple[Any, list[tuple[Any, str]]]]]:
    """Every parameter (deduplicated, tied weights once) and buffer (with all its owners)."""
    params: dict[int, object] = {}
    buffers: dict[int, tuple[Any, list[tuple[Any, str]]]] = {}
    for module in _modules(pipe):
        for sub in module.modules():
            for p in sub._parameters.values():
                if p is not None:
                    params.setdefault(id(p), p)
            for name, b in sub._buffers.items():
                if b is not None:
                    buffers.setdefault(id(b), (b, []))[1].append((sub, name))
    return list(params.values()), list(buffers.values())


def _copy_to_host(tensors: list[Any], pin: bool, buffer: Any = None) -> tuple[list[Any], Any]:
    """Copy tensors into one flat host buffer (pinned: one allocation, DMA-able, not rounded
    up per tensor; ``buffer`` is reused when it fits) and return views of it shaped like
    the sources, and the buffer."""
    import torch

    align = 256
    offsets: list[int] = []
    total = 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // align) * align
    total = max(total, align)
    if buffer is None or buffer.numel() < total or buffer.is_pinned() != pin:
        buffer = torch.empty(total, dtype=torch.uint8, device="cpu", pin_memory=pin)
    out = []
    for t, offset in zip(tensors, offsets):
        view = buffer[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t, non_blocking=pin)
        out.append(view)
    return out, buffer


def _move_modules(pipe: Any, device: str, *, pin: bool, buffer: Any = None) -> Any:
    """Move every weight of the pipeline to ``device``: into one flat (pinned) host buffer
    (device -> host; ``buffer`` from the previous offload is reused) or from it (host ->
    device, non-blocking DMA when pinned), then synchronise. Returns the host buffer."""
    import torch

    target = torch.device(device)
    params, buffers = _collect_tensors(pipe)
    sources = [p.data for p in params] + [b for b, _owners in buffers]
    with torch.no_grad():
        if target.type == "cpu":
            moved, buffer = _copy_to_host(sources, pin, buffer)
        else:
            moved = [t.to(target, non_blocking=pin) for t in sources]
        for p, t in zip(params, moved):
            p.data = t
        for (_b, owners), t in zip(buffers, moved[len(params) :]):
            for sub, name in owners:
                sub._buffers[name] = t
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return buffer


class CudaGraphs:
    """CUDA graphs of one pipeline's UNet step (and optionally VAE decode), one per input
    shape, sharing one memory pool; ``pipe.unet.forward`` / ``pipe.vae.decode`` are
    patched to copy their inputs into the static buffers and replay. Calls with a shape
    or an argument that was not captured run the original eager function."""

    def __init__(self, pipe: Any, device: str):
        import torch

        self.torch = torch
        self.pipe, self.device = pipe, torch.device(device)
        self.pool = torch.cuda.graph_pool_handle()
        # key (input shapes, dtype) -> (graph, static inputs, static output)
        self.unet_graphs: dict[tuple[Any, ...], tuple[Any, list[Any], Any]] = {}
        self.vae_graphs: dict[tuple[Any, ...], tuple[Any, list[Any], Any]] = {}
        self._unet_forward = pipe.unet.forward
        self._vae_decode = pipe.vae.decode
        pipe.unet.forward = self._unet_call
        pipe.vae.decode = self._vae_call

    def release(self) -> None:
        """Restore the eager functions and drop the graphs (their pool is freed)."""
        for module, attr in ((self.pipe.unet, "forward"), (self.pipe.vae, "decode")):
            module.__dict__.pop(attr, None)
        self.unet_graphs.clear()
        self.vae_graphs.clear()
        self.pool = None

    def _capture(self, fn: Callable[..., Any], static_inputs: list[Any]) -> tuple[Any, list[Any], Any]:
        torch = self.torch
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up (cuDNN/cuBLAS choices, lazy inits) outside the capture
            for _ in range(2):
                fn(*static_inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn(*static_inputs)
        return graph, static_inputs, out

    # --- UNet step ---------------------------------------------------------------------
    @staticmethod
    def _unet_key(sample: Any, encoder_hidden_states: Any) -> tuple[Any, ...]:
        return tuple(sample.shape), tuple(encoder_hidden_states.shape), sample.dtype

    def capture_unet(self, rows: int, height: int, width: int, seq_len: int) -> None:
        torch, unet = self.torch, self.pipe.unet
        sample = torch.randn(rows, unet.config.in_channels, height, width, device=self.device, dtype=unet.dtype)
        timestep = torch.tensor(999.0, device=self.device)  # float32 0-d; int timesteps are copied in exactly
        states = torch.randn(rows, seq_len, unet.config.cross_attention_dim, device=self.device, dtype=unet.dtype)
        forward = self._unet_forward
        self.unet_graphs[self._unet_key(sample, states)] = self._capture(
            lambda s, t, e: forward(s, t, encoder_hidden_states=e, return_dict=False)[0], [sample, timestep, states]
        )

    def _unet_call(
        self,
        sample: Any,
        timestep: Any,
        encoder_hidden_states: Any = None,
        *args: Any,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        torch = self.torch
        entry = None
        if (
            not args
            and all(v is None for v in kwargs.values())
            and encoder_hidden_states is not None
            and torch.is_tensor(timestep)
            and timestep.numel() == 1
        ):
            entry = self.unet_graphs.get(self._unet_key(sample, encoder_hidden_states))
        if entry is None:
            return self._unet_forward(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        graph, (s, t, e), out = entry
        s.copy_(sample)
        t.copy_(timestep.reshape(()))
        e.copy_(encoder_hidden_states)
        graph.replay()
        result = out.clone()
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=result)
        return (result,)

    # --- VAE decode --------------------------------------------------------------------
    def capture_vae(self, batch: int, height: int, width: int) -> None:
        torch, vae = self.torch, self.pipe.vae
        z = torch.randn(batch, vae.config.latent_channels, height, width, device=self.device, dtype=vae.dtype)
        decode = self._vae_decode
        self.vae_graphs[(tuple(z.shape), z.dtype)] = self._capture(lambda x: decode(x, return_dict=False)[0], [z])

    def _vae_call(self, z: Any, return_dict: bool = True, generator: Any = None) -> Any:
        entry = self.vae_graphs.get((tuple(z.shape), z.dtype))
        if entry is None:
            return self._vae_decode(z, return_dict=return_dict, generator=generator)
        graph, (static_z,), out = entry
        static_z.copy_(z)
        graph.replay()
        result = out.clone()
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput

            return DecoderOutput(sample=result)
        return (result,)


class DiffusersModel:
    """One text-to-image pipeline, loadable, offloadable to host memory, and freeable.

    ``pad_grid``: batch sizes a batch is padded up to (graph mode captures these);
    ``cuda_graphs``: graph mode (CUDA only, else eager with a log line);
    ``pin_host_memory``: keep offloaded weights in pinned host memory (None: auto, on CUDA
    when host memory allows; env DIFFSERVE_PIN_HOST_MEMORY);
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
        self.pin_host_memory = _pin_setting(pin_host_memory)
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
                _move_modules(self.pipe, self.device, pin=self._pinned)
            else:
                self.pipe.to(self.device)
            self._on_host = self._pinned = False
        elif self.pipe is None:
            self.pipe = self._from_pretrained()
        if self.cuda_graphs and self.graphs is None:
            self.capture()
        self.last_load_s = time.perf_counter() - start
        return self.last_load_s

    def _from_pretrained(self) -> Any:
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
        return pipe.to(self.device)

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
            need, free = _module_bytes(self.pipe), _available_host_bytes()
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
                    self._host_buffer = _move_modules(self.pipe, "cpu", pin=pin, buffer=self._host_buffer)
                except RuntimeError as exc:  # pinning can fail (locked-memory limits): fall back
                    if not pin:
                        raise
                    log.warning(
                        "pinned offload failed; using pageable memory", extra={"model": self.name, "error": str(exc)}
                    )
                    pin = False
                    self._host_buffer = _move_modules(self.pipe, "cpu", pin=False)
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


class TimmDiscriminator:
    """EfficientNet-V2 (timm) with a 2-class head: P(class 'real') is the confidence that
    the light image is good enough. On CUDA it runs fp16, channels-last (``half``)."""

    backend = "diffusers"

    def __init__(
        self,
        checkpoint_dir: str | None,
        device: str = "auto",
        *,
        meta: dict[str, Any] | None = None,
        half: bool | None = None,
    ):
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.device = resolve_device(device)
        if meta is None:
            if self.checkpoint_dir is None:
                raise ValueError("a discriminator needs a checkpoint folder or its meta")
            meta = json.loads((self.checkpoint_dir / DISCRIMINATOR_CONFIG).read_text())
        self.meta: dict[str, Any] = meta
        self.input_size = int(self.meta["input_size"])
        self.half = self.device.startswith("cuda") if half is None else half
        self.model: Any = None

    @classmethod
    def from_model(cls, model: Any, meta: dict[str, Any], device: str = "auto", half: bool | None = None) -> Self:
        """Wrap an in-memory model (e.g. random weights for profiling); already loaded."""
        disc = cls(None, device, meta=meta, half=half)
        disc._place(model)
        return disc

    def _place(self, model: Any) -> None:
        import torch

        model = model.to(self.device).eval()
        if self.half:
            model = model.to(dtype=torch.float16, memory_format=torch.channels_last)
        self.model = model

    def load(self) -> float:
        if self.checkpoint_dir is None:
            raise ValueError("this discriminator wraps an in-memory model: there is no checkpoint to load")
        start = time.perf_counter()
        self._place(load_discriminator_model(self.checkpoint_dir, self.meta))
        return time.perf_counter() - start

    def score(
        self,
        prompts: list[str],
        images: Sequence[Image.Image | None],
        prompt_indices: list[int | None] | None = None,
    ) -> list[float]:
        """Confidence per image (``prompt_indices`` matter only to the profiled backend's replay)."""
        import torch

        present = [img for img in images if img is not None]
        if len(present) != len(images):
            raise ValueError("the timm discriminator scores images: got a batch with some missing")
        batch = preprocess(present, self.meta).to(self.device)
        if self.half:
            batch = batch.to(dtype=torch.float16, memory_format=torch.channels_last)
        with torch.inference_mode():
            probs = torch.softmax(self.model(batch).float(), dim=1)
        scores: list[float] = probs[:, int(self.meta["positive_class"])].tolist()
        return scores


def build_discriminator_model(arch: str, num_classes: int = 2, pretrained: bool = False) -> Any:
    import timm

    return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes)


def load_discriminator_model(checkpoint_dir: Path, meta: dict[str, Any]) -> Any:
    from safetensors.torch import load_file

    model = build_discriminator_model(meta["arch"], len(meta["classes"]))
    model.load_state_dict(load_file(str(Path(checkpoint_dir) / DISCRIMINATOR_WEIGHTS)))
    return model


def save_discriminator(model: Any, checkpoint_dir: str | Path, meta: dict[str, Any]) -> None:
    """safetensors weights + a JSON of what is needed to use them (no pickle)."""
    from safetensors.torch import save_file

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = checkpoint_dir / (DISCRIMINATOR_WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(checkpoint_dir / DISCRIMINATOR_WEIGHTS)  # a crash mid-save keeps the previous weights
    (checkpoint_dir / DISCRIMINATOR_CONFIG).write_text(json.dumps(meta, indent=2))


def discriminator_meta(arch: str, input_size: int) -> dict[str, Any]:
    return {
        "arch": arch,
        "input_size": input_size,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "classes": ["generated", "real"],
        "positive_class": 1,
    }


def preprocess(images: Sequence[Image.Image], meta: dict[str, Any]) -> Any:
    """PIL images -> normalised NCHW float tensor at the discriminator's input size."""
    import numpy as np
    import torch

    size = int(meta["input_size"])
    arrays = [
        np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        for img in images
    ]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    return (batch - mean) / std
