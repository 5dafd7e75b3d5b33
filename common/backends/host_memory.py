"""A pipeline's weights in host memory: moved into one flat (pinned, where it pays) host buffer when
the model is parked, and back to the device from it (a fast role switch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HOST_RESERVE_BYTES = 4 << 30  # leave this much host memory free when deciding to pin


def available_host_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# torch and diffusers objects are typed Any (see pyproject.toml): the pipeline, its modules, tensors.
def modules(pipe: Any) -> list[Any]:
    import torch

    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]


def module_bytes(pipe: Any) -> int:
    total = 0
    for module in modules(pipe):
        total += sum(t.numel() * t.element_size() for t in module.parameters())
        total += sum(t.numel() * t.element_size() for t in module.buffers())
    return total


def collect_tensors(pipe: Any) -> tuple[list[Any], list[tuple[Any, list[tuple[Any, str]]]]]:
    """Every parameter (deduplicated, tied weights once) and buffer (with all its owners)."""
    params: dict[int, object] = {}
    buffers: dict[int, tuple[Any, list[tuple[Any, str]]]] = {}
    for module in modules(pipe):
        for sub in module.modules():
            for p in sub._parameters.values():
                if p is not None:
                    params.setdefault(id(p), p)
            for name, b in sub._buffers.items():
                if b is not None:
                    buffers.setdefault(id(b), (b, []))[1].append((sub, name))
    return list(params.values()), list(buffers.values())


def copy_to_host(tensors: list[Any], pin: bool, buffer: Any = None) -> tuple[list[Any], Any]:
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
    for t, offset in zip(tensors, offsets, strict=False):
        view = buffer[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t, non_blocking=pin)
        out.append(view)
    return out, buffer


def move_modules(pipe: Any, device: str, *, pin: bool, buffer: Any = None) -> Any:
    """Move every weight of the pipeline to ``device``: into one flat (pinned) host buffer
    (device -> host; ``buffer`` from the previous offload is reused) or from it (host ->
    device, non-blocking DMA when pinned), then synchronise. Returns the host buffer."""
    import torch

    target = torch.device(device)
    params, buffers = collect_tensors(pipe)
    sources = [p.data for p in params] + [b for b, _owners in buffers]
    with torch.no_grad():
        if target.type == "cpu":
            moved, buffer = copy_to_host(sources, pin, buffer)
        else:
            moved = [t.to(target, non_blocking=pin) for t in sources]
        for p, t in zip(params, moved, strict=False):
            p.data = t
        for (_b, owners), t in zip(buffers, moved[len(params) :], strict=False):
            for sub, name in owners:
                sub._buffers[name] = t
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return buffer
