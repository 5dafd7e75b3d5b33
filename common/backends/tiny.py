"""``diffserve make-tiny-models DIR``: tiny random-weight pipelines and a tiny discriminator,
built from configs and saved with ``save_pretrained``, so tests run the real loading
and inference code offline on a CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.backends.discriminator import build_discriminator_model, discriminator_meta, save_discriminator

TINY_DISCRIMINATOR_ARCH = "test_efficientnet"  # timm's tiny EfficientNet, same code path as EfficientNet-V2
TINY_DISCRIMINATOR_INPUT = 32


def _byte_unicode_map() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (CLIP's BPE vocabulary is built on it)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=False))


def _tiny_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_byte_unicode_map().values())
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>")]
    vocab_tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def make_tiny_pipeline(out_dir: Path, scheduler: str) -> None:
    import tempfile

    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tiny_tokenizer(Path(tmp))
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=77,
                projection_dim=32,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
        )
        if scheduler == "euler_trailing":
            sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", timestep_spacing="trailing", steps_offset=1)
        else:
            sched = DDIMScheduler(
                beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
            )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(str(out_dir))


def make_tiny_discriminator(out_dir: Path) -> None:
    import torch

    torch.manual_seed(0)
    model = build_discriminator_model(TINY_DISCRIMINATOR_ARCH)
    save_discriminator(model, out_dir, discriminator_meta(TINY_DISCRIMINATOR_ARCH, TINY_DISCRIMINATOR_INPUT))


def make_tiny_models(model_dir: str | Path, models: tuple[str, ...] = ("sdturbo", "sdv15")) -> Path:
    """Build the tiny models under ``model_dir`` (``<model>/`` pipelines and ``discriminator/``)."""
    from common.cascades import MODELS

    root = Path(model_dir)
    for name in models:
        if not (root / name / "model_index.json").exists():
            make_tiny_pipeline(root / name, MODELS[name].scheduler or "ddim")
    if not (root / "discriminator" / "model.safetensors").exists():
        make_tiny_discriminator(root / "discriminator")
    return root
