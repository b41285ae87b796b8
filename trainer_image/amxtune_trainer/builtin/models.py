"""Built-in Stable Diffusion pipelines, needing no hub access.

Made locally with random weights, written once as ordinary diffusers folders into the cache:
- `tiny`: a few hundred thousand parameters, trains in seconds; plumbing tests.
- `sd15-arch`: the real SD-1.5 architecture (UNet 320/640/1280/1280, CLIP ViT-L/14 text
  encoder, SD VAE, a 49,408-entry vocabulary) with random weights, for speed measurements:
  speed does not depend on the weight values.
Shipped pretrained, inside this package:
- `toyworld`: a small model of a drawn toy world (amxtune_trainer.toyworld), pretrained by
  this project, so that learning shows: the demo and the learning tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from amxtune_trainer.builtin.tokenizer import SHIPPED_DIR, write_tokenizer

# Bump when a builder changes so that caches are rebuilt, not silently reused.
BUILTIN_VERSION = 1

SD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}


@dataclass(frozen=True)
class BuiltinSpec:
    unet: dict
    vae: dict
    text: dict
    vocab_size: int | None  # None: the shipped tiny vocabulary as it is


BUILTINS: dict[str, BuiltinSpec] = {
    "tiny": BuiltinSpec(
        unet={
            "sample_size": 8,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        vae={
            "block_out_channels": (16, 32, 32, 32),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
            "sample_size": 64,
        },
        text={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
        },
        vocab_size=None,
    ),
    "sd15-arch": BuiltinSpec(
        unet={
            "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        },
        vae={
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2,
            "latent_channels": 4,
            "sample_size": 512,
        },
        text={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
        },
        vocab_size=49408,
    ),
}


PRETRAINED: dict[str, Path] = {"toyworld": Path(__file__).parent / "toyworld"}
NAMES = (*BUILTINS, *PRETRAINED)


def cache_root() -> Path:
    return Path(os.environ.get("AMXTUNE_CACHE", Path.home() / ".cache" / "amxtune"))


def builtin_model_dir(name: str) -> Path:
    return cache_root() / "models" / f"{name}-v{BUILTIN_VERSION}"


def ensure_builtin_model(name: str) -> Path:
    """Return the folder of built-in model `name`, building it on first use (atomically)."""
    if name in PRETRAINED:
        folder = PRETRAINED[name]
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"the pretrained built-in model {name} is missing from "
                                    f"{folder}: reinstall amxtune-trainer")
        return folder
    if name not in BUILTINS:
        raise KeyError(f"unknown built-in model {name!r}; choose one of {sorted(NAMES)}")
    target = builtin_model_dir(name)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_builtin_model(name, staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_builtin_model(name: str, folder: Path, seed: int = 0) -> None:
    """Write the random-weight pipeline `name` into `folder` as a diffusers pipeline."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = BUILTINS[name]
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = SHIPPED_DIR if spec.vocab_size is None else write_tokenizer(
            Path(tmp) / "tokenizer", vocab_size=spec.vocab_size
        )
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **spec.text,
    )
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL(**spec.vae),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**spec.unet),
        scheduler=PNDMScheduler.from_config(SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(folder))
    # transformers 5 writes only tokenizer.json; older readers need the slow-tokenizer files.
    save_slow_tokenizer_files(tokenizer, folder / "tokenizer")


def save_slow_tokenizer_files(tokenizer, folder: Path) -> None:
    """Write vocab.json and merges.txt beside tokenizer.json for readers that need them."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    vocab = tokenizer.get_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    merges = getattr(tokenizer, "bpe_ranks", None)
    if merges:
        ordered = sorted(merges.items(), key=lambda item: item[1])
        lines = [" ".join(pair) for pair, _ in ordered]
    else:  # fast tokenizer: merges live in the backend's model
        state = json.loads(tokenizer.backend_tokenizer.to_str())
        lines = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in lines))
