"""Device check of the GPU worker's speed paths (run on a lent GPU; a few minutes on an H100).

    python benchmarks/gpu_speed.py [--batches 1,2,4,8] [--repeats 3] [--models sdturbo,sdv15]
                                   [--no-disk] [--json results.json]

For SD-Turbo and SD v1.5 with random full-size weights (``tools.profile``'s builders,
fp16; latency does not depend on the weights) it prints:
- ms per batch, eager vs CUDA-graph replay (``DiffusersModel`` graph mode), per batch size;
- the graph capture time, and the largest pixel difference between the eager and the
  graph images of the same prompts and seeds (same kernels: expected 0 or a few levels);
- the role-switch time back from host memory (pinned and pageable; recapture included)
  and from disk (``save_pretrained`` folder, page cache warm since it was just written).
On a machine without CUDA it prints a 'no CUDA device' line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _ms(model, batch: int, repeats: int, prompts: list[str]) -> float:
    seeds = list(range(batch))
    model.generate(prompts[:batch], seeds)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(prompts[:batch], seeds)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _pixels(images):
    import numpy as np

    return np.stack([np.asarray(img, dtype=np.int16) for img in images])


def bench_model(name: str, batches: list[int], repeats: int, disk: bool, prompts: list[str]) -> dict:
    import torch

    from common.backends.diffusion import DiffusersModel
    from tools.profile import random_model

    role = "light" if name == "sdturbo" else "heavy"
    result: dict = {"model": name}
    torch.cuda.reset_peak_memory_stats()
    model = random_model(name, role, "cuda", cuda_graphs=False)
    result["build_s"] = round(model.load("disk"), 3)
    result["eager_ms"] = {b: round(_ms(model, b, repeats, prompts), 1) for b in batches}
    check_batch = min(2, max(batches))
    eager_images = _pixels(model.generate(prompts[:check_batch], list(range(check_batch))))

    model.cuda_graphs, model.pad_grid = True, tuple(batches)
    result["capture_s"] = round(model.capture(), 3)
    result["graph_batches"] = sorted(k[0][0] for k in model.graphs.unet_graphs)
    result["graph_ms"] = {b: round(_ms(model, b, repeats, prompts), 1) for b in batches}
    graph_images = _pixels(model.generate(prompts[:check_batch], list(range(check_batch))))
    result["max_pixel_diff_eager_vs_graph"] = int(abs(eager_images - graph_images).max())

    for pin in (True, False):
        model.pin_host_memory = pin
        start = time.perf_counter()
        model.offload()
        offload_s = time.perf_counter() - start
        pinned = model._pinned
        load_s = model.load("host")
        result[f"host_{'pinned' if pin else 'pageable'}"] = {
            "to_host_s": round(offload_s, 3),
            "back_s": round(load_s, 3),
            "recapture_s": round(model.last_capture_s, 3),
            "pinned": pinned,
        }
    switched = _pixels(model.generate(prompts[:check_batch], list(range(check_batch))))
    result["max_pixel_diff_after_host_switch"] = int(abs(graph_images - switched).max())
    result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    if disk:
        with tempfile.TemporaryDirectory() as tmp:
            model.pipe.save_pretrained(tmp)
            spec = model.spec
            model.unload()
            from dataclasses import replace

            fresh = DiffusersModel(replace(spec, hub_id=tmp), role, "cuda", cuda_graphs=True, pad_grid=tuple(batches))
            load_s = fresh.load("disk")
            result["disk"] = {
                "load_s": round(load_s, 3),
                "capture_s": round(fresh.last_capture_s, 3),
                "page_cache": "warm",
            }
            fresh.unload()
    else:
        model.unload()
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="sdturbo,sdv15")
    p.add_argument("--no-disk", action="store_true", help="skip the save + load-from-disk switch")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(
            "no CUDA device: gpu_speed.py measures the CUDA path (eager vs CUDA graphs, host/disk switch); "
            "nothing to run here"
        )
        return 0
    import logging

    import diffusers

    from common.profiles import load_prompts

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="invalid value encountered in cast")  # random weights: NaN pixels
    batches = sorted({int(b) for b in args.batches.split(",")})
    prompts = load_prompts()[: max(batches)]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  diffusers {diffusers.__version__}")
    results = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        r = bench_model(name, batches, args.repeats, not args.no_disk, prompts)
        results.append(r)
        print(f"\n== {name} (random full-size weights, fp16) build {r['build_s']} s, peak {r['peak_gib']} GiB")
        print(f"{'batch':>6} {'eager ms':>10} {'graph ms':>10} {'speed-up':>9}")
        for b in batches:
            e, g = r["eager_ms"][b], r["graph_ms"][b]
            print(f"{b:>6} {e:>10.1f} {g:>10.1f} {e / g:>8.2f}x")
        print(
            f"capture {r['capture_s']} s for UNet rows {r['graph_batches']}; "
            f"max pixel diff eager vs graph {r['max_pixel_diff_eager_vs_graph']}, "
            f"after host switch {r['max_pixel_diff_after_host_switch']}"
        )
        for key in ("host_pinned", "host_pageable"):
            h = r[key]
            print(f"switch {key}: to host {h['to_host_s']} s, back {h['back_s']} s (recapture {h['recapture_s']} s)")
        if "disk" in r:
            print(f"switch from disk: {r['disk']['load_s']} s (capture {r['disk']['capture_s']} s, page cache warm)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
