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


@dataclass(frozen=True, kw_only=True)
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
            name="sdturbo-sdv15",
            light="sdturbo",
            heavy="sdv15",
            slo_ms=5000,
            runtimes_file="stable_diffusion_runtimes_sdturbo.csv",
            light_row="sdturbo",
            heavy_row="sdv15",
            h100_light_row="sdturbo",
            h100_heavy_row="sdv15",
            f_curve_file="f_t_sdturbo_sdv15.csv",
            quality_column="sdturbo_sdv15",
        ),
        CascadeSpec(
            name="sdxs-sdv15",
            light="sdxs",
            heavy="sdv15",
            slo_ms=5000,
            runtimes_file="stable_diffusion_runtimes_sdxs.csv",
            light_row="sdturbo",
            heavy_row="sdv15",
            h100_light_row=None,
            h100_heavy_row="sdv15",
            f_curve_file=None,
            quality_column="sdxs_sdv15",
        ),
        CascadeSpec(
            name="sdxlltn-sdxl",
            light="sdxlltn",
            heavy="sdxl",
            slo_ms=15000,
            runtimes_file="stable_diffusion_runtimes_sdxlltn.csv",
            light_row="sdturbo",
            heavy_row="sdv15",
            h100_light_row="sdxlltn",
            h100_heavy_row="sdxl",
            f_curve_file=None,
            quality_column="sdxlltn_sdxl",
        ),
    )
}

DEFAULT_CASCADE = "sdturbo-sdv15"


def cascade(name: str) -> CascadeSpec:
    try:
        return CASCADES[name]
    except KeyError:
        raise ValueError(f"unknown cascade {name!r}; known: {', '.join(CASCADES)}") from None
