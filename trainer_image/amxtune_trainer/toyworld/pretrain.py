"""Pretrain the built-in `toyworld` model from nothing but the drawn world (world.py).

    python -m amxtune_trainer.toyworld pretrain --output DIR [--seed 0] ...

Stages, each deterministic from --seed (on one CPU class; bf16 on AMX changes the last bits):
1. tokenizer: CLIP's format, BPE merges learned from the world's words and the prompt
   templates', so every word of a caption is one token;
2. VAE (AutoencoderKL, 64 px <-> 4 x 16 x 16): L1 + MSE reconstruction and a small KL term on
   rendered scenes; its scaling factor makes the latents unit-variance;
3. text encoder (CLIPTextModel) and UNet (UNet2DConditionModel) together, on the scenes'
   latents (encoded once) and captions: the epsilon-prediction loss of Stable Diffusion's noise
   schedule, weighted by min-SNR (gamma 5), with 10 % empty captions so that classifier-free
   guidance works; the UNet's weights are averaged (EMA) and the average is what is saved.
The result is an ordinary diffusers StableDiffusionPipeline folder plus manifest.json (seed,
steps, data version, command, losses, sha256 of every file).
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from amxtune_trainer.toyworld import world

MANIFEST = "manifest.json"


@dataclass
class PretrainConfig:
    seed: int = 0
    vae_steps: int = 4000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    unet_steps: int = 8000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    text_lr: float = 2e-4
    scenes: int = 20000  # distinct scenes in the UNet's data set
    ema_decay: float = 0.999
    # min-SNR loss weighting (Hang et al. 2023): converges faster; 0 turns it off. The loss
    # logged and recorded stays the unweighted one, comparable across settings.
    snr_gamma: float = 5.0
    empty_caption: float = 0.1
    # fp32: these layers are too small for bf16 to pay (measured slower on AMX, 3.4 vs 2.3 s)
    precision: str = "fp32"
    log_every: int = 100
    unet_channels: tuple[int, ...] = (32, 64, 64)
    text_width: int = 64
    text_layers: int = 3
    vae_channels: tuple[int, ...] = (16, 64, 64)
    losses: dict = field(default_factory=dict)


def tokenizer_corpus() -> list[str]:
    """The built-in corpus (prompt templates, common words) plus the world's words, the world's
    weighted up so that each becomes one token."""
    from amxtune_trainer.builtin.tokenizer import CORPUS

    return CORPUS + world.vocabulary() * 20


def build_models(config: PretrainConfig, tokenizer):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(config.seed)
    blocks = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=config.vae_channels, layers_per_block=1, norm_num_groups=16,
        sample_size=world.IMAGE_SIZE,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_width,
        intermediate_size=config.text_width * 4, num_hidden_layers=config.text_layers,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=config.text_width, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    levels = len(config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 2 ** (blocks - 1), in_channels=4, out_channels=4,
        block_out_channels=config.unet_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=config.text_width, norm_num_groups=32,
        # diffusers reads attention_head_dim as the number of heads: 32-wide heads
        attention_head_dim=[max(1, c // 32) for c in config.unet_channels],
    )
    return vae, text_encoder, unet


def scene_batch(seeds: list[int]):
    """Pixels in [-1, 1] (N, 3, 64, 64) and captions of the scenes with these seeds."""
    import numpy as np
    import torch

    images, captions = [], []
    for seed in seeds:
        item = world.scene(seed)
        images.append(np.asarray(world.render(item), dtype=np.float32) / 127.5 - 1.0)
        captions.append(world.caption(item, seed + 1))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return pixels, captions


def log(message: str) -> None:
    print(f"[toyworld {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def autocast(bf16: bool):
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_vae(vae, config: PretrainConfig, bf16: bool) -> float:
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.vae_lr, config.vae_steps,
                                                   pct_start=0.05)
    rng = random.Random(config.seed * 7919 + 1)
    vae.train()
    recent: list[float] = []
    for step in range(1, config.vae_steps + 1):
        pixels, _ = scene_batch([rng.randrange(1 << 40) for _ in range(config.vae_batch)])
        with autocast(bf16):
            posterior = vae.encode(pixels).latent_dist
            decoded = vae.decode(posterior.sample()).sample
        decoded = decoded.float()
        loss = (F.l1_loss(decoded, pixels) + F.mse_loss(decoded, pixels)
                + 1e-6 * posterior.kl().mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent = [*recent, float(loss.detach())][-config.log_every:]
        if step % config.log_every == 0 or step == config.vae_steps:
            log(f"vae step {step}/{config.vae_steps} loss {sum(recent) / len(recent):.4f}")
    vae.eval()
    return sum(recent) / len(recent)


def encode_scenes(vae, config: PretrainConfig, bf16: bool):
    """Latent means and stds of `config.scenes` scenes, and their seeds."""
    import torch

    base = config.seed * 1_000_003 + 17
    seeds = [base + i for i in range(config.scenes)]
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(seeds), 256):
            pixels, _ = scene_batch(seeds[start:start + 256])
            with autocast(bf16):
                latent = vae.encode(pixels).latent_dist
            means.append(latent.mean.float())
            stds.append(latent.std.float())
    return torch.cat(means), torch.cat(stds), seeds


def train_unet(unet, text_encoder, tokenizer, latents, config: PretrainConfig, bf16: bool):
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from amxtune_trainer.builtin.models import SD_SCHEDULER

    means, stds, seeds, scale = latents
    scheduler = DDPMScheduler.from_config({**SD_SCHEDULER, "prediction_type": "epsilon"})
    signal_to_noise = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    params = [
        {"params": unet.parameters(), "lr": config.unet_lr},
        {"params": text_encoder.parameters(), "lr": config.text_lr},
    ]
    optimizer = torch.optim.AdamW(params, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, [config.unet_lr, config.text_lr], config.unet_steps, pct_start=0.05)
    ema = copy.deepcopy(unet).requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed * 31 + 5)
    rng = random.Random(config.seed * 31 + 6)
    unet.train()
    text_encoder.train()
    recent: list[float] = []
    for step in range(1, config.unet_steps + 1):
        index = torch.randint(0, len(seeds), (config.unet_batch,), generator=generator)
        captions = []
        for i in index.tolist():
            if rng.random() < config.empty_caption:
                captions.append("")
            else:
                captions.append(world.caption(world.scene(seeds[i]), rng.randrange(1 << 40)))
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        sample = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        clean = sample * scale
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps,
                                  (config.unet_batch,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        with autocast(bf16):
            hidden = text_encoder(ids)[0]
            prediction = unet(noisy, timesteps, hidden).sample
        per_sample = F.mse_loss(prediction.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        if config.snr_gamma > 0:
            snr = signal_to_noise[timesteps]
            loss = (per_sample * torch.clamp(snr, max=config.snr_gamma) / snr).mean()
        else:
            loss = per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text_encoder.parameters()], 1.0)
        optimizer.step()
        schedule.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, current in zip(ema.parameters(), unet.parameters(), strict=True):
                average.lerp_(current, 1 - decay)
        recent = [*recent, float(per_sample.mean().detach())][-config.log_every:]
        if step % config.log_every == 0 or step == config.unet_steps:
            log(f"unet step {step}/{config.unet_steps} loss {sum(recent) / len(recent):.4f}")
    text_encoder.eval()
    return ema.eval(), sum(recent) / len(recent)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def pretrain(output: Path, config: PretrainConfig, command: list[str]) -> dict:
    import tempfile

    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from amxtune_trainer import cpu
    from amxtune_trainer.builtin.models import SD_SCHEDULER, save_slow_tokenizer_files
    from amxtune_trainer.builtin.tokenizer import write_tokenizer

    started = time.time()
    probe = cpu.probe()
    bf16 = config.precision == "bf16"
    log(f"CPU {probe.summary()}; training in {'bf16' if bf16 else 'fp32'}")
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tokenizer(Path(tmp) / "tokenizer", num_merges=4000,
                                 corpus=tokenizer_corpus())
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    split = [w for w in world.vocabulary() if "-" not in w  # CLIP splits at hyphens anyway
             and len(tokenizer.encode(w, add_special_tokens=False)) != 1]
    if split:
        raise RuntimeError(f"the tokenizer splits world words: {split}")
    vae, text_encoder, unet = build_models(config, tokenizer)
    counts = {name: sum(p.numel() for p in module.parameters())
              for name, module in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet))}
    log(f"parameters: {counts}")

    vae_loss = train_vae(vae, config, bf16)
    means, stds, seeds = encode_scenes(vae, config, bf16)
    scale = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scale)
    log(f"latents {tuple(means.shape[1:])}, scaling factor {scale:.4f}")
    ema_unet, unet_loss = train_unet(unet, text_encoder, tokenizer,
                                     (means, stds, seeds, scale), config, bf16)

    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=ema_unet,
        scheduler=PNDMScheduler.from_config(SD_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    output.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(str(output))
    save_slow_tokenizer_files(tokenizer, output / "tokenizer")
    config.losses = {"vae": round(vae_loss, 5), "unet": round(unet_loss, 5)}
    manifest = {
        "model": "toyworld",
        "data_version": world.DATA_VERSION,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "command": " ".join(command),
        "parameters": counts,
        "cpu": probe.summary(),
        "precision": "bf16" if bf16 else "fp32",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "wall_seconds": round(time.time() - started, 1),
        "sha256": folder_digests(output),
    }
    (output / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    log(f"wrote {output} ({size / 2**20:.1f} MiB) in {manifest['wall_seconds'] / 60:.1f} min")
    return manifest


def record_evaluation(folder: Path, evaluation: dict) -> None:
    """Keep evaluate's fractions in the manifest (it is not among the digested files)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["evaluation"] = evaluation
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def check_manifest(folder: Path) -> list[str]:
    """Files whose sha256 differs from the manifest's (or that are missing or extra)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    actual = folder_digests(folder)
    expected = manifest["sha256"]
    problems = [f"{name}: missing" for name in expected if name not in actual]
    problems += [f"{name}: not in the manifest" for name in actual if name not in expected]
    problems += [f"{name}: sha256 differs" for name in expected
                 if name in actual and actual[name] != expected[name]]
    return problems
