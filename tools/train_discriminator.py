"""``diffserve train-discriminator``: train the cascade's discriminator, as in the
DiffServe paper: an EfficientNet-V2 (timm) that tells real images from the light model's.

    diffserve train-discriminator --data DIR --out CKPT_DIR [--arch tf_efficientnetv2_s]
        [--input-size 224] [--epochs N] [--batch-size B] [--lr LR] [--max-steps N]
        [--device auto] [--resume] [--pretrained]

Data layout (images of any size, resized to the input size):

    DIR/real/*.png|jpg|jpeg|webp        real images (e.g. the prompts' DiffusionDB / COCO images)  -> class 1
    DIR/generated/*.png|jpg|jpeg|webp   the light model's images for the same kind of prompts       -> class 0

The confidence the cascade routes on is P(real) (``positive_class`` 1): a light image the
discriminator takes for real is good enough to answer with.

Output (``--out``), all without pickle:
- ``model.safetensors`` + ``discriminator.json`` (arch, input size, normalisation, classes,
  positive class): the checkpoint ``TimmDiscriminator`` loads (``--discriminator-checkpoint``);
- ``optimizer.safetensors`` (AdamW moments) + ``train_state.json`` (step, epoch, settings,
  history): what ``--resume`` continues from. Shuffling is seeded per epoch, so a resumed
  run sees the same batches an uninterrupted one would.

``--max-steps`` counts optimizer steps in total (a resumed run stops at the same step).
``--pretrained`` starts from timm's ImageNet weights (needs the Hugging Face hub or its cache).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.backends import require_models_extra
from common.backends.devices import resolve_device
from common.backends.discriminator import (
    DISCRIMINATOR_WEIGHTS,
    build_discriminator_model,
    discriminator_meta,
    save_discriminator,
)

log = logging.getLogger("diffserve.train_discriminator")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CLASSES = ("generated", "real")  # index = label; discriminator_meta's order
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"


def list_images(data_dir: str | Path) -> list[tuple[Path, int]]:
    """(path, label) pairs from DIR/generated (0) and DIR/real (1), sorted."""
    data_dir = Path(data_dir)
    items = []
    for label, folder in enumerate(CLASSES):
        sub = data_dir / folder
        if not sub.is_dir():
            raise SystemExit(f"train-discriminator: missing {sub}/ (see --help for the layout)")
        items += [(p, label) for p in sorted(sub.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    counts = [sum(1 for _p, y in items if y == label) for label in range(len(CLASSES))]
    if min(counts) == 0:
        found = dict(zip(CLASSES, counts, strict=True))
        raise SystemExit(f"train-discriminator: need images in both DIR/real and DIR/generated; found {found}")
    return items


class ImageDataset:
    """Resize to the input size (as serving does), random horizontal flip when training,
    normalise with the checkpoint's mean/std."""

    def __init__(self, items: list[tuple[Path, int]], meta: dict[str, Any], train: bool):
        self.items, self.meta, self.train = items, meta, train

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        import torch
        from PIL import Image

        from common.backends.discriminator import preprocess

        path, label = self.items[index]
        with Image.open(path) as img:
            image = img.convert("RGB")
        if self.train and random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return preprocess([image], self.meta)[0], torch.tensor(label)


def split_items(
    items: list[tuple[Path, int]], val_fraction: float, seed: int
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    rng = random.Random(seed)
    shuffled = items[:]
    rng.shuffle(shuffled)
    n_val = int(len(shuffled) * val_fraction)
    return shuffled[n_val:], shuffled[:n_val]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order: list[int] = torch.randperm(n, generator=g).tolist()
    return order


def lr_at(step: int, total: int, base: float, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * 0.5 * (1 + math.cos(math.pi * progress))


# --- optimizer state without pickle: tensors -> safetensors, the rest -> JSON ----------------
def save_optimizer(optimizer: Any, out_dir: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors: dict[str, Any] = {}
    scalars: dict[str, Any] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if hasattr(value, "shape"):
                tensors[f"{pid}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    save_file(tensors, str(out_dir / (OPTIMIZER_FILE + ".tmp")))
    (out_dir / (OPTIMIZER_FILE + ".tmp")).replace(out_dir / OPTIMIZER_FILE)
    return {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: Any, out_dir: Path, saved: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    entries: dict[int, dict[str, Any]] = {}
    for name, tensor in load_file(str(out_dir / OPTIMIZER_FILE)).items():
        pid, key = name.split(".", 1)
        entries.setdefault(int(pid), {})[key] = tensor
    for name, value in saved.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        entries.setdefault(int(pid), {})[key] = value
    groups = saved["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": entries, "param_groups": groups})


def save_checkpoint(
    model: Any, optimizer: Any, out_dir: Path, meta: dict[str, Any], train_state: dict[str, Any]
) -> None:
    save_discriminator(model, out_dir, {**meta, "trained_steps": train_state["step"]})
    train_state = {**train_state, "optimizer": save_optimizer(optimizer, out_dir)}
    tmp = out_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(train_state, indent=2))
    tmp.replace(out_dir / STATE_FILE)


def evaluate(model: Any, loader: Any, device: str, autocast: Callable[[], Any]) -> dict[str, Any]:
    import torch

    model.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.inference_mode(), autocast():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x).float()
            loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
    model.train()
    return {"val_loss": loss_sum / max(1, total), "val_accuracy": correct / max(1, total), "val_images": total}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="diffserve train-discriminator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="folder with real/ and generated/ images")
    p.add_argument("--out", required=True, help="checkpoint folder (written, and read by --resume)")
    p.add_argument("--arch", default="tf_efficientnetv2_s", help="timm architecture")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps in total (0: none)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share for accuracy after each epoch")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at each epoch end)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--pretrained", action="store_true", help="start from timm's ImageNet weights")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume) to the step the arguments ask for; returns the final training state."""
    return Trainer(args).run()


class Trainer:
    """One training run: its data split, model, optimizer and step counter, saved at every checkpoint."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args, self.device = args, resolve_device(args.device)
        self.out_dir = Path(args.out)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        state_path = self.out_dir / STATE_FILE
        saved = json.loads(state_path.read_text()) if args.resume and state_path.exists() else None
        if args.resume and saved is None:
            log.info("no %s in %s: starting fresh", STATE_FILE, self.out_dir)
        if saved:  # the architecture and input come from the checkpoint being resumed
            args.arch, args.input_size = saved["arch"], saved["input_size"]
        self.meta = discriminator_meta(args.arch, args.input_size)
        self.train_items, self.val_items = split_items(list_images(args.data), args.val_fraction, args.seed)
        if saved and saved.get("n_train") != len(self.train_items):
            log.warning(
                "the data set changed since the checkpoint (%s -> %d training images): the epoch order differs",
                saved.get("n_train"),
                len(self.train_items),
            )
        self.counts = [sum(1 for _p, y in self.train_items if y == c) for c in range(len(CLASSES))]
        weights = [len(self.train_items) / (len(CLASSES) * max(1, k)) for k in self.counts]
        self.class_weight = torch.tensor(weights, device=self.device)
        self.model, self.optimizer = self._model(saved)
        self.steps_per_epoch = math.ceil(len(self.train_items) / args.batch_size)
        self.total_steps = args.epochs * self.steps_per_epoch
        if args.max_steps:
            self.total_steps = min(self.total_steps, args.max_steps) if args.epochs else args.max_steps
        self.step: int = saved["step"] if saved else 0
        self.history: list[dict[str, Any]] = saved.get("history", []) if saved else []

    def _model(self, saved: dict[str, Any] | None) -> tuple[Any, Any]:
        """The model and its optimizer: fresh (timm's ImageNet weights with --pretrained), or resumed."""
        import torch

        args = self.args
        model = build_discriminator_model(args.arch, len(CLASSES), pretrained=args.pretrained and not saved)
        if saved:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(self.out_dir / DISCRIMINATOR_WEIGHTS)))
        model.to(self.device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        if saved:
            load_optimizer(optimizer, self.out_dir, saved["optimizer"])
        return model, optimizer

    def autocast(self) -> Any:
        """bfloat16 autocast on CUDA; nothing on a CPU."""
        import contextlib

        import torch

        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def state(self, epoch: int) -> dict[str, Any]:
        args = self.args
        return {
            "step": self.step,
            "epoch": epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "arch": args.arch,
            "input_size": args.input_size,
            "n_train": len(self.train_items),
            "n_val": len(self.val_items),
            "seed": args.seed,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "class_counts": dict(zip(CLASSES, self.counts, strict=True)),
            "history": self.history,
        }

    def run(self) -> dict[str, Any]:
        from torch.utils.data import DataLoader
        from tqdm import tqdm

        args = self.args
        if self.step >= self.total_steps:
            log.info("already at step %d of %d: nothing to do", self.step, self.total_steps)
            return self.state(self.step // max(1, self.steps_per_epoch))
        val_loader = (
            DataLoader(
                ImageDataset(self.val_items, self.meta, train=False),
                batch_size=args.batch_size,
                num_workers=args.workers,
            )
            if self.val_items
            else None
        )
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=args.quiet)
        start_time = time.perf_counter()
        while self.step < self.total_steps:
            epoch = self.step // self.steps_per_epoch
            loss_value = self._epoch(bar)
            if self.step % self.steps_per_epoch == 0:  # the epoch is done
                record = {"epoch": epoch, "step": self.step, "train_loss": loss_value}
                if val_loader is not None:
                    record.update(evaluate(self.model, val_loader, self.device, self.autocast))
                self.history.append(record)
                log.info("epoch %d done: %s", epoch, record)
            save_checkpoint(
                self.model, self.optimizer, self.out_dir, self.meta, self.state(self.step // self.steps_per_epoch)
            )
        bar.close()
        final = self.state(self.step // self.steps_per_epoch)
        took = time.perf_counter() - start_time
        log.info("trained to step %d in %.1f s; checkpoint in %s", self.step, took, self.out_dir)
        return final

    def _epoch(self, bar: Any) -> float:
        """The rest of the current epoch (in its seeded order), or up to the total; the last loss."""
        import torch
        from torch.utils.data import DataLoader

        args = self.args
        epoch, done_in_epoch = divmod(self.step, self.steps_per_epoch)
        order = epoch_order(len(self.train_items), args.seed, epoch)
        batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)][done_in_epoch:]
        train_set = ImageDataset(self.train_items, self.meta, train=True)
        loader = DataLoader(
            train_set, batch_sampler=batches, num_workers=args.workers, pin_memory=self.device.startswith("cuda")
        )
        loss_value = float("nan")
        for x, y in loader:
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.step, self.total_steps, args.lr, args.warmup_steps, args.schedule)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.autocast():
                logits = self.model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y, weight=self.class_weight)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            loss_value = loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch)
            if self.step >= self.total_steps:
                break
            if args.save_every and self.step % args.save_every == 0:
                save_checkpoint(self.model, self.optimizer, self.out_dir, self.meta, self.state(epoch))
        return loss_value


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    require_models_extra("train-discriminator")
    state = train(args)
    print(f"step {state['step']} of {state['total_steps']}; checkpoint in {args.out}")


if __name__ == "__main__":
    main()
