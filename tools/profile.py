"""``diffserve profile``: batch latency of each model of a cascade on this device.

    diffserve profile --backend diffusers --model-dir /models --cascade sdturbo-sdv15 \\
        --batches 1,2,4,8,16,32 --repeats 3 --out table.csv [--mode eager|graph|both]

writes the table in the artifact's column layout (``common.profiles.write_latency_table``),
one row per model and batch size: the light and heavy model under their names
(``sdturbo``, ``sdv15``, ...) and the discriminator under its architecture without the
``tf_`` prefix (``efficientnetv2_s``), so ``--latency-file table.csv`` feeds the planner
and the profiled backend. A batch that runs out of memory is written as 100000 ms (the
artifact's "does not fit" marker, which the loader leaves out).

``--random-weights`` builds the full-size SD-Turbo / SD v1.5 architectures from the
published configs embedded below (and a random EfficientNet-V2-S) instead of loading
weights: latency does not depend on weight values, so a GPU host can be profiled before
anything is downloaded. Accelerator label (``Accel`` column): ``--accel`` or derived from
the device, dtype and mode, e.g. ``h100_fp16_graph``, ``cpu_fp32_eager``. With
``--mode both`` the eager rows come first and the graph rows last (pass the accel to the
loader to pick one; without it, the later graph rows win).
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.cascades import MODELS, cascade
from common.profiles import BATCH_GRID, DOES_NOT_FIT_MS, LatencyTable, load_prompts, write_latency_table

if TYPE_CHECKING:  # the models extra: imported where used
    from common.backends.diffusion import DiffusersModel
    from common.backends.discriminator import TimmDiscriminator

log = logging.getLogger("diffserve.profile")

DISCRIMINATOR_ARCH = "tf_efficientnetv2_s"
DISCRIMINATOR_INPUT = 224

# Published diffusers configs (the fields that shape the network), embedded so nothing is downloaded.
_SD_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
}
SD15_UNET = {**_SD_UNET, "cross_attention_dim": 768, "attention_head_dim": 8}  # stable-diffusion-v1-5/unet
SD21_UNET = {
    **_SD_UNET,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],  # sd-turbo/unet
    "use_linear_projection": True,
    "upcast_attention": False,
}
SD_VAE = {  # the SD 1.x / 2.x autoencoder (sd-turbo/vae, stable-diffusion-v1-5/vae)
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
CLIP_L_TEXT = {  # openai/clip-vit-large-patch14 text tower (SD v1.5)
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
OPENCLIP_H_TEXT = {  # OpenCLIP ViT-H/14 text tower, penultimate layer (SD 2.x, SD-Turbo)
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
}
RANDOM_ARCHITECTURES = {"sdturbo": (SD21_UNET, OPENCLIP_H_TEXT), "sdv15": (SD15_UNET, CLIP_L_TEXT)}
# parameter counts of the published checkpoints (unet, vae, text encoder): tests check the configs
PARAMETER_COUNTS = {"sdturbo": (865910724, 83653863, 340387840), "sdv15": (859520964, 83653863, 123060480)}


def _dtype_name(dtype: Any) -> str:
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[str(dtype).replace("torch.", "")]


def build_random_components(
    name: str, device: str = "cpu", dtype: Any = None, token_ids: dict[str, int] | None = None
) -> tuple[Any, Any, Any]:
    """(unet, vae, text_encoder) of ``name`` with random weights, built on ``device``
    (``meta`` builds shapes only); ``token_ids``: bos/eos/pad ids of the tokenizer used."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if name not in RANDOM_ARCHITECTURES:
        raise ValueError(f"random weights are built for {', '.join(RANDOM_ARCHITECTURES)} only, not {name!r}")
    unet_cfg, text_cfg = RANDOM_ARCHITECTURES[name]
    dtype = dtype or torch.float32
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**SD_VAE)
        text = CLIPTextModel(CLIPTextConfig(**text_cfg, **(token_ids or {})))
    if device != "meta":
        unet, vae, text = (m.to(dtype).eval() for m in (unet, vae, text))
    return unet, vae, text


def build_random_pipeline(name: str, device: str = "cpu", dtype: Any = None, seed: int = 0) -> Any:
    """A full-size StableDiffusionPipeline of ``name`` (sdturbo or sdv15) with random weights
    and a small byte-level tokenizer (prompts still pad to 77 tokens, as with CLIP's)."""
    import torch
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    from common.backends.tiny import _tiny_tokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tiny_tokenizer(Path(tmp))
    unet, vae, text = build_random_components(
        name,
        device,
        dtype,
        {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
    )
    if MODELS[name].scheduler == "euler_trailing":
        scheduler = EulerDiscreteScheduler(**_SCHEDULER, timestep_spacing="trailing")
    else:
        scheduler = DDIMScheduler(**_SCHEDULER, clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_model(name: str, role: str, device: str = "auto", **kwargs: Any) -> DiffusersModel:
    """A DiffusersModel whose load() builds the random-weight pipeline (no files)."""
    from common.backends.devices import resolve_device
    from common.backends.diffusion import DiffusersModel

    device = resolve_device(device)
    spec = MODELS[name]
    model = DiffusersModel(spec, role, device, **kwargs)
    model.pipeline_factory = lambda: build_random_pipeline(name, device, model._dtype())
    return model


def random_discriminator(
    device: str = "auto", arch: str = DISCRIMINATOR_ARCH, input_size: int = DISCRIMINATOR_INPUT
) -> TimmDiscriminator:
    from common.backends.discriminator import TimmDiscriminator, build_discriminator_model, discriminator_meta

    return TimmDiscriminator.from_model(build_discriminator_model(arch), discriminator_meta(arch, input_size), device)


def discriminator_row(arch: str) -> str:
    return arch[3:] if arch.startswith("tf_") else arch


def accel_name(device: str, mode: str, dtype_name: str | None = None) -> str:
    from common.backends.devices import device_slug, resolve_device

    device = resolve_device(device)
    dtype_name = dtype_name or ("fp16" if device.startswith("cuda") else "fp32")
    return f"{device_slug(device)}_{dtype_name}_{mode}"


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def time_batches(
    run: Callable[[int, int], object],
    batches: list[int],
    repeats: int,
    warmup: int = 1,
    label: str = "",
    progress: bool = True,
) -> dict[int, float]:
    """Median ms of ``run(batch, repeat)`` per batch size; a batch that runs out of memory
    (and every larger one) is marked as not fitting."""
    from tqdm import tqdm

    out: dict[int, float] = {}
    bar = tqdm(total=len(batches) * (warmup + repeats), desc=label or "profile", disable=not progress, leave=False)
    for i, b in enumerate(sorted(batches)):
        times = []
        try:
            for r in range(warmup + repeats):
                start = time.perf_counter()
                run(b, r)
                if r >= warmup:
                    times.append((time.perf_counter() - start) * 1000)
                bar.update(1)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            _empty_cuda_cache()
            log.warning("%s: batch %d does not fit; marking it and larger batches", label, b)
            for rest in sorted(batches)[i:]:
                out[rest] = DOES_NOT_FIT_MS
            break
        out[b] = statistics.median(times)
    bar.close()
    return out


def _empty_cuda_cache() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _prompt_batch(prompts: list[str], b: int, r: int) -> list[str]:
    """b prompts, a different slice per repeat (cycling through the list)."""
    return [prompts[(r * b + i) % len(prompts)] for i in range(b)]


def _make_model(args: argparse.Namespace, name: str, role: str, graph: bool, grid: tuple[int, ...]) -> DiffusersModel:
    from common.backends.diffusion import DiffusersModel, local_spec, tiny_spec

    if args.random_weights:
        return random_model(name, role, args.device, cuda_graphs=graph, pad_grid=grid if graph else ())
    spec = MODELS[name]
    spec = tiny_spec(spec, args.model_dir) if args.backend == "tiny" else local_spec(spec, args.model_dir)
    return DiffusersModel(spec, role, args.device, cuda_graphs=graph, pad_grid=grid if graph else ())


def _make_discriminator(args: argparse.Namespace) -> TimmDiscriminator:
    from common.backends.discriminator import TimmDiscriminator

    checkpoint = args.discriminator_checkpoint or (
        str(Path(args.model_dir) / "discriminator") if args.model_dir else None
    )
    if args.random_weights or not checkpoint or not Path(checkpoint).is_dir():
        if args.backend == "tiny":
            raise SystemExit("profile: the tiny backend needs --model-dir with a discriminator/ folder")
        log.info("profiling a random-weight %s discriminator", DISCRIMINATOR_ARCH)
        return random_discriminator(args.device)
    disc = TimmDiscriminator(checkpoint, args.device)
    disc.load()
    return disc


def profile_model(
    args: argparse.Namespace, name: str, role: str, modes: list[str], prompts: list[str]
) -> dict[str, LatencyTable]:
    """Eager and/or graph tables of one model, loaded once."""
    graph_first = modes == ["graph"]
    grid = tuple(sorted(args.batches))
    model = _make_model(args, name, role, graph_first, grid)
    load_s = model.load("disk")
    print(f"{name}: loaded in {load_s:.2f} s" + (f" (capture {model.last_capture_s:.2f} s)" if graph_first else ""))
    tables = {}
    for mode in modes:
        if mode == "graph" and not model.cuda_graphs:
            model.cuda_graphs, model.pad_grid = True, grid
            capture_s = model.capture()
            print(f"{name}: CUDA graphs captured in {capture_s:.2f} s")

        def run(b: int, r: int) -> None:
            model.generate(_prompt_batch(prompts, b, r), list(range(r * b, r * b + b)))

        ms = time_batches(run, args.batches, args.repeats, args.warmup, f"{name} {mode}", not args.quiet)
        tables[mode] = LatencyTable(name, ms, f"profile:{mode}")
    model.unload()
    _empty_cuda_cache()
    return tables


def profile_discriminator(args: argparse.Namespace, resolution: int) -> LatencyTable:
    import numpy as np
    from PIL import Image

    disc = _make_discriminator(args)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8))

    def run(b: int, r: int) -> None:
        disc.score([""] * b, [image] * b)

    ms = time_batches(run, args.batches, args.repeats, max(args.warmup, 1), "discriminator", not args.quiet)
    return LatencyTable(discriminator_row(disc.meta["arch"]), ms, "profile")


def _merge(path: Path, parts: list[tuple[list[LatencyTable], str]]) -> None:
    """One file with several accel labels: each part through write_latency_table, rows renumbered."""
    rows: list[list[str]] = []
    header: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (tables, accel) in enumerate(parts):
            part = Path(tmp) / f"{i}.csv"
            write_latency_table(part, tables, accel)
            with open(part, newline="") as fh:
                reader = csv.reader(fh)
                header = next(reader)
                rows += list(reader)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i, row in enumerate(rows):
            w.writerow([i] + row[1:])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="diffserve profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backend", choices=("tiny", "diffusers"), default="diffusers")
    p.add_argument(
        "--model-dir",
        help="tiny: make-tiny-models folder; diffusers: folder of local pipelines "
        "named like the models (else the hub id)",
    )
    p.add_argument(
        "--discriminator-checkpoint",
        help="discriminator folder (default MODEL_DIR/discriminator; "
        "random weights when absent on the diffusers backend)",
    )
    p.add_argument("--cascade", default="sdturbo-sdv15")
    p.add_argument(
        "--models",
        default="light,heavy,discriminator",
        help="which of light,heavy,discriminator to profile (default all)",
    )
    p.add_argument("--batches", default=",".join(map(str, BATCH_GRID)), help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per batch size (median is written)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per batch size first")
    p.add_argument("--out", required=True, help="output CSV (artifact layout)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="full-size architectures with random weights (sdturbo, sdv15): no download",
    )
    p.add_argument(
        "--mode",
        choices=("eager", "graph", "both"),
        default="eager",
        help="eager, CUDA-graph replay, or both (graph needs CUDA; on CPU it is skipped)",
    )
    p.add_argument(
        "--accel",
        help="Accel label (default: device_dtype_mode, e.g. h100_fp16_eager); "
        "with --mode both, _eager/_graph are appended",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.backend == "tiny" and not args.model_dir:
        p.error("the tiny backend needs --model-dir (made by `diffserve make-tiny-models DIR`)")
    if args.backend == "tiny" and args.random_weights:
        p.error("--random-weights builds the full-size models: use it with --backend diffusers")
    return args


def main(argv: list[str] | None = None) -> None:
    from common.backends import require_backend
    from common.backends.devices import resolve_device

    args = parse_args(argv)
    require_backend(args.backend)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the tokenizer warns on every prompt over 77 tokens
    warnings.filterwarnings("ignore", message="invalid value encountered in cast")  # random weights give NaNs
    args.device = resolve_device(args.device)
    spec = cascade(args.cascade)
    modes = ["eager", "graph"] if args.mode == "both" else [args.mode]
    if "graph" in modes and not args.device.startswith("cuda"):
        log.info("CUDA graphs need a CUDA device; profiling eager only")
        modes = ["eager"]
    prompts = load_prompts()
    by_mode: dict[str, list[LatencyTable]] = {m: [] for m in modes}
    resolution = MODELS[spec.light].resolution if args.backend != "tiny" else 64
    for role, name in (("light", spec.light), ("heavy", spec.heavy)):
        if role in args.models:
            for mode, table in profile_model(args, name, role, modes, prompts).items():
                by_mode[mode].append(table)
    if "discriminator" in args.models:
        disc = profile_discriminator(args, resolution)
        for mode in modes:  # the discriminator always runs eager; its row goes under every label
            by_mode[mode].append(disc)
    dtype = "fp16" if args.device.startswith("cuda") else "fp32"
    if len(modes) == 1:
        parts = [(by_mode[modes[0]], args.accel or accel_name(args.device, modes[0], dtype))]
    else:
        parts = [(by_mode[m], f"{args.accel}_{m}" if args.accel else accel_name(args.device, m, dtype)) for m in modes]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _merge(out, parts)
    for tables, accel in parts:
        print(f"\n{accel}: ms per batch")
        print("model".ljust(18) + "".join(f"{b:>10}" for b in args.batches))
        for t in tables:
            print(
                t.model.ljust(18)
                + "".join(
                    f"{t.batch_ms[b]:>10.1f}"
                    if t.batch_ms.get(b, DOES_NOT_FIT_MS) < DOES_NOT_FIT_MS
                    else f"{'oom':>10}"
                    for b in args.batches
                )
            )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
