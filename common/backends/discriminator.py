"""The discriminator model: EfficientNet-V2 (timm) with a 2-class head, its checkpoint format
(safetensors weights and a JSON of what using them needs; no pickle) and its preprocessing."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from PIL import Image

from common.backends.devices import resolve_device

DISCRIMINATOR_CONFIG = "discriminator.json"
DISCRIMINATOR_WEIGHTS = "model.safetensors"


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
