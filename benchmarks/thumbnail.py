"""Should a light worker attach an RGB thumbnail for the discriminator, or let it decode the PNG?

Prints, per 512x512 image (SD-Turbo's size), what each side costs on this CPU: the worker's PNG
encode (paid either way), the discriminator's PNG decode + resize (without a thumbnail), the worker's
thumbnail (resize + bytes) and the discriminator's thumbnail unpack (with one), and the bytes each
puts through Redis. Noisy images are the expensive case for PNG (as on the H100 notes: 40-57 ms).

    python benchmarks/thumbnail.py [--size 224] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from PIL import Image

from common.imaging import decode, encode, from_thumbnail, thumbnail_rgb


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="discriminator input size")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    images = {
        "noisy": Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)),
        "smooth": Image.fromarray(np.linspace(0, 255, 512 * 512 * 3).reshape(512, 512, 3).astype(np.uint8)),
    }
    print(f"per image, 512x512, thumbnail {args.size}x{args.size}, median of {args.repeats} (ms / KiB)")
    print(
        f"{'image':8} {'png encode':>11} {'png KiB':>8} {'disc: decode+resize':>20} "
        f"{'worker: thumbnail':>18} {'disc: unpack':>13} {'thumb KiB':>10}"
    )
    for name, image in images.items():
        png = encode(image, "png")
        thumb = thumbnail_rgb(image, args.size)
        # each timed call binds this iteration's image (run before the next one)
        enc = _median_ms(lambda image=image: encode(image, "png"), args.repeats)
        dec = _median_ms(lambda png=png: decode(png).resize((args.size, args.size), Image.BILINEAR), args.repeats)
        make = _median_ms(lambda image=image: thumbnail_rgb(image, args.size), args.repeats)
        unpack = _median_ms(lambda thumb=thumb: from_thumbnail(thumb, args.size), args.repeats)
        print(
            f"{name:8} {enc:11.2f} {len(png) / 1024:8.0f} {dec:20.2f} {make:18.2f} {unpack:13.3f} "
            f"{len(thumb) / 1024:10.0f}"
        )


if __name__ == "__main__":
    main()
