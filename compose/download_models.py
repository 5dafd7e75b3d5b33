"""Pre-download the models of a cascade into the Hugging Face cache (``HF_HOME``).

The compose ``models`` service runs this once (``docker compose --profile setup run --rm
models``) so that the workers, which run with ``HF_HUB_OFFLINE=1``, load the pipelines from
the shared ``models`` volume instead of each downloading several GB at start-up.

It fetches what ``AutoPipelineForText2Image.from_pretrained(hub_id)`` (the diffusers backend,
no ``variant``) reads: ``model_index.json``, the components' configs, tokenizers and their
full-precision ``*.safetensors`` weights -- not the single-file ``*.ckpt``/``*.safetensors``
checkpoints at the repository root, the fp16/EMA variants, ``*.bin``, Flax or ONNX files.
For SDXL-Lightning it also fetches the distilled UNet file.

    python compose/download_models.py                      # $DIFFSERVE_CASCADE or the default cascade
    python compose/download_models.py --cascade sdxlltn-sdxl
    python compose/download_models.py --all --dry-run      # list what would be fetched

The discriminator checkpoint is not on the hub: train it (``diffserve train-discriminator``)
and put it where ``DIFFSERVE_DISCRIMINATOR_CHECKPOINT`` points.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    from common.cascades import CASCADES, DEFAULT_CASCADE, MODELS, cascade
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from common.cascades import CASCADES, DEFAULT_CASCADE, MODELS, cascade

# What diffusers' from_pretrained loads without a variant (fnmatch patterns; `*` spans `/`).
PIPELINE_PATTERNS = [
    "model_index.json",
    "*/*.json",
    "*/*.txt",
    "*/*.model",
    "*/diffusion_pytorch_model.safetensors",
    "*/diffusion_pytorch_model-*-of-*.safetensors",
    "*/model.safetensors",
    "*/model-*-of-*.safetensors",
]


@dataclass(frozen=True)
class Download:
    repo_id: str
    patterns: tuple[str, ...] | None = None  # snapshot of these files
    filename: str | None = None  # or this one file

    def describe(self) -> str:
        what = self.filename or ", ".join(self.patterns or ("everything",))
        return f"{self.repo_id}: {what}"


def downloads_for(cascade_names: list[str]) -> list[Download]:
    """The hub files of the light and heavy models of these cascades, each once."""
    seen: list[Download] = []
    for name in cascade_names:
        spec = cascade(name)
        for model_name in (spec.light, spec.heavy):
            model = MODELS[model_name]
            wanted = [Download(model.hub_id, tuple(PIPELINE_PATTERNS))]
            if model.unet_repo and model.unet_file:
                wanted.append(Download(model.unet_repo, filename=model.unet_file))
            seen += [d for d in wanted if d not in seen]
    return seen


def fetch(item: Download, cache_dir: str | None) -> str:
    from huggingface_hub import hf_hub_download, snapshot_download

    if item.filename:
        return hf_hub_download(item.repo_id, item.filename, cache_dir=cache_dir)
    return snapshot_download(item.repo_id, allow_patterns=list(item.patterns or ()), cache_dir=cache_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cascade",
        action="append",
        default=None,
        help=f"cascade to fetch (repeatable; default $DIFFSERVE_CASCADE or {DEFAULT_CASCADE}); "
        f"known: {', '.join(CASCADES)}",
    )
    parser.add_argument("--all", action="store_true", help="fetch every known cascade")
    parser.add_argument(
        "--cache-dir", default=None, help="hub cache folder (default: $HF_HOME/hub, as the services read it)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched and stop")
    args = parser.parse_args(argv)

    names = list(CASCADES) if args.all else (args.cascade or [os.environ.get("DIFFSERVE_CASCADE") or DEFAULT_CASCADE])
    try:
        items = downloads_for(names)
    except ValueError as exc:
        print(f"download_models: {exc}", file=sys.stderr)
        return 2
    print(f"cascades: {', '.join(names)}; cache: {args.cache_dir or os.environ.get('HF_HOME', '(hub default)')}")
    for item in items:
        print(f"  {item.describe()}")
    if args.dry_run:
        return 0
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        print("download_models: HF_HUB_OFFLINE is set; unset it to download", file=sys.stderr)
        return 2
    failed = 0
    for item in items:
        try:
            path = fetch(item, args.cache_dir)
            print(f"ok   {item.repo_id} -> {path}", flush=True)
        except Exception as exc:  # report every failure, then fail the run
            failed += 1
            print(f"FAIL {item.repo_id}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
