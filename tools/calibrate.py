"""``diffserve calibrate``: measure f(t) of a cascade, the share of prompts whose
discriminator confidence on the light model's image is below t.

    diffserve calibrate --backend diffusers --model-dir /models --discriminator-checkpoint ckpt/ \\
        --cascade sdturbo-sdv15 --prompts prompts.txt --limit 1000 --out f_t.csv \\
        [--hist hist.csv] [--confidence-out confidences.csv]

Runs the light model and the discriminator over the first ``--limit`` prompts (after
``--offset``) in batches and writes:
- ``--out``: f(t) on the 0.05 grid in the artifact's layout (``,t,f_t``; f(0) = 0 and
  f(1) = 1 by convention, as in ``common/data/diffserve/f_t_sdturbo_sdv15.csv``), read by
  ``common.profiles.load_confidence_curve`` (``--curve-file`` of the services);
- ``--hist``: ``bin_low,bin_high,count,share`` of the confidences;
- ``--confidence-out``: ``prompt_index,confidence`` lines (index into the prompt file),
  the format the profiled discriminator replays (``--confidence-file``).
The seed of prompt i is ``--seed + i``.
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

from common.profiles import ConfidenceCurve, load_prompts, write_confidence_curve

log = logging.getLogger("diffserve.calibrate")

GRID_STEP = 0.05


def curve_from_confidences(confidences: list[float], step: float = GRID_STEP) -> ConfidenceCurve:
    """f(t) = share of confidences < t on the grid 0, step, ..., 1 (f(0) = 0, f(1) = 1)."""
    n_points = round(1 / step)
    ts = [round(i * step, 4) for i in range(n_points + 1)]
    n = len(confidences)
    fs = [sum(c < t for c in confidences) / n if n else 0.0 for t in ts]
    fs[0], fs[-1] = 0.0, 1.0
    return ConfidenceCurve(ts, fs, "calibrate")


def histogram(confidences: list[float], bins: int = 20) -> list[tuple[float, float, int, float]]:
    counts = [0] * bins
    for c in confidences:
        counts[min(bins - 1, max(0, int(c * bins)))] += 1
    n = max(1, len(confidences))
    return [(round(i / bins, 4), round((i + 1) / bins, 4), k, round(k / n, 6)) for i, k in enumerate(counts)]


def write_histogram(path: str | Path, rows: list[tuple[float, float, int, float]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["bin_low", "bin_high", "count", "share"])
        w.writerows(rows)


def write_confidences(path: str | Path, indexed: list[tuple[int, float]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("prompt_index,confidence\n")
        for index, confidence in indexed:
            fh.write(f"{index},{confidence:.6f}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="diffserve calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backend", choices=("tiny", "diffusers"), default="diffusers")
    p.add_argument("--model-dir", help="tiny: make-tiny-models folder; diffusers: folder of local pipelines")
    p.add_argument("--discriminator-checkpoint", help="discriminator folder (default MODEL_DIR/discriminator)")
    p.add_argument("--cascade", default="sdturbo-sdv15")
    p.add_argument("--prompts", help="prompt file, one per line (default: the DiffusionDB 5k of the artifact)")
    p.add_argument("--offset", type=int, default=0, help="skip this many prompts first")
    p.add_argument("--limit", type=int, default=500, help="prompts to run (0: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="prompt i is generated with seed SEED + i")
    p.add_argument("--device", default="auto")
    p.add_argument("--cuda-graphs", action="store_true", help="graph mode for the light model (CUDA only)")
    p.add_argument("--out", required=True, help="f(t) CSV")
    p.add_argument("--hist", help="confidence histogram CSV")
    p.add_argument("--bins", type=int, default=20)
    p.add_argument("--confidence-out", help="prompt_index,confidence lines")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.backend == "tiny" and not args.model_dir:
        p.error("the tiny backend needs --model-dir (made by `diffserve make-tiny-models DIR`)")
    return args


def run_cascade_light(args: argparse.Namespace, prompts: list[tuple[int, str]]) -> list[tuple[int, float]]:
    """(prompt index, confidence) for each prompt: light model, then discriminator."""
    from tqdm import tqdm

    from common.backends import BackendSettings, make_discriminator, make_model
    from common.imaging import PngImage, decode

    settings = BackendSettings(
        backend=args.backend,
        cascade=args.cascade,
        model_dir=args.model_dir,
        discriminator_checkpoint=args.discriminator_checkpoint,
        device=args.device,
        cuda_graphs=args.cuda_graphs,
    )
    model = make_model(settings, "light")
    model.load("disk")
    disc = make_discriminator(settings)
    disc.load()
    out: list[tuple[int, float]] = []
    with tqdm(total=len(prompts), desc="calibrate", unit="prompt", disable=args.quiet) as bar:
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start : start + args.batch_size]
            texts = [text for _i, text in chunk]
            images = model.generate(texts, [args.seed + i for i, _text in chunk])
            scores = disc.score(texts, [decode(img) if isinstance(img, PngImage) else img for img in images])
            out += [(i, float(c)) for (i, _text), c in zip(chunk, scores, strict=False)]
            bar.update(len(chunk))
            bar.set_postfix(mean=f"{sum(c for _i, c in out) / len(out):.3f}")
    model.unload()
    return out


def main(argv: list[str] | None = None) -> None:
    from common.backends import require_backend

    args = parse_args(argv)
    require_backend(args.backend)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the tokenizer warns on every prompt over 77 tokens
    all_prompts = load_prompts(args.prompts)
    end = len(all_prompts) if not args.limit else args.offset + args.limit
    prompts = list(enumerate(all_prompts))[args.offset : end]
    if not prompts:
        raise SystemExit("calibrate: no prompts selected")
    indexed = run_cascade_light(args, prompts)
    confidences = [c for _i, c in indexed]
    curve = curve_from_confidences(confidences)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_confidence_curve(args.out, curve)
    if args.hist:
        write_histogram(args.hist, histogram(confidences, args.bins))
    if args.confidence_out:
        write_confidences(args.confidence_out, indexed)
    mean = sum(confidences) / len(confidences)
    print(
        f"{len(confidences)} prompts, mean confidence {mean:.3f}; "
        + ", ".join(f"f({t})={curve.f(t):.3f}" for t in (0.25, 0.5, 0.75))
    )
    print(
        f"wrote {args.out}"
        + (f", {args.hist}" if args.hist else "")
        + (f", {args.confidence_out}" if args.confidence_out else "")
    )


if __name__ == "__main__":
    main()
