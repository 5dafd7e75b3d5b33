"""The model registry: the cascades of the DiffServe paper and their models.

Adding a cascade is one entry in ``CASCADES`` (and its models in ``MODELS``).
Profile file names point into ``common/data`` (copied from the paper's artifact,
see ``common/data/diffserve/README.md``) and the H100 table we measured
(``common/data/h100/README.md``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str
    steps: int
    guidance: float
    resolution: int
    dtype: str = "float16"  # on CUDA; CPU always runs float32
    scheduler: str | None = None  # None keeps the pipeline's own scheduler
    unet_repo: str | None = None  # a distilled UNet that replaces the base one (SDXL-Lightning)
    unet_file: str | None = None


@dataclass(frozen=True)
class CascadeSpec:
    name: str
    light: str
    heavy: str
    slo_ms: float
    runtimes_file: str  # artifact table; its light rows are labelled light_row, heavy rows heavy_row
    light_row: str
    heavy_row: str
    h100_light_row: str | None  # rows of the H100 table, where measured
    h100_heavy_row: str | None
    f_curve_file: str | None  # None: no calibrated curve shipped, see ConfidenceCurve.borrowed
    quality_column: str | None  # column of fid_vs_light_share.csv


MODELS = {
    m.name: m
    for m in (
        ModelSpec("sdturbo", "stabilityai/sd-turbo", steps=1, guidance=0.0, resolution=512, scheduler="euler_trailing"),
        ModelSpec("sdxs", "IDKiro/sdxs-512-0.9", steps=1, guidance=0.0, resolution=512),
        ModelSpec(
            "sdv15",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            steps=50,
            guidance=7.5,
            resolution=512,
            scheduler="ddim",
        ),
        ModelSpec("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", steps=50, guidance=7.5, resolution=1024),
        ModelSpec(
            "sdxlltn",
            "stabilityai/stable-diffusion-xl-base-1.0",
            steps=2,
            guidance=0.0,
            resolution=1024,
            scheduler="euler_trailing",
            unet_repo="ByteDance/SDXL-Lightning",
            unet_file="sdxl_lightning_2step_unet.safetensors",
        ),
    )
}

# The artifact's tables label the light rows "sdturbo" and the heavy rows "sdv15" in
# every file, whatever the cascade; the row names below follow the files as shipped.
CASCADES = {
    c.name: c
    for c in (
        CascadeSpec(
            "sdturbo-sdv15",
            "sdturbo",
            "sdv15",
            5000,
            "stable_diffusion_runtimes_sdturbo.csv",
            "sdturbo",
            "sdv15",
            "sdturbo",
            "sdv15",
            "f_t_sdturbo_sdv15.csv",
            "sdturbo_sdv15",
        ),
        CascadeSpec(
            "sdxs-sdv15",
            "sdxs",
            "sdv15",
            5000,
            "stable_diffusion_runtimes_sdxs.csv",
            "sdturbo",
            "sdv15",
            None,
            "sdv15",
            None,
            "sdxs_sdv15",
        ),
        CascadeSpec(
            "sdxlltn-sdxl",
            "sdxlltn",
            "sdxl",
            15000,
            "stable_diffusion_runtimes_sdxlltn.csv",
            "sdturbo",
            "sdv15",
            "sdxlltn",
            "sdxl",
            None,
            "sdxlltn_sdxl",
        ),
    )
}

DEFAULT_CASCADE = "sdturbo-sdv15"


def cascade(name: str) -> CascadeSpec:
    try:
        return CASCADES[name]
    except KeyError:
        raise ValueError(f"unknown cascade {name!r}; known: {', '.join(CASCADES)}") from None
