"""Which device a model runs on, and what it is: ``auto`` resolved, a short accelerator name for
profile labels, and the shipped profile set that fits it."""

from __future__ import annotations

import re


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
