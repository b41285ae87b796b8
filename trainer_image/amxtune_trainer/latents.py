"""The training images as VAE latent distributions, and every step's random draws from them.

The VAE runs once per image and flip variant at start (rank 0); the latent distribution
(mean, std) is broadcast and sampled per step, as the reference scripts do after encoding every
step. Every draw of a step (images, flips, the recipe's prompt choices, latent samples,
timesteps, noise) derives from (seed, step, micro-batch, rank), so a resumed run continues
exactly as an uninterrupted one, and N ranks see what one rank with N times the batch would.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from amxtune_trainer.runtime import seed_for

EVAL_SEED = 20240607


@dataclass
class Draw:
    """One micro-batch: which images, and the tensors the loss needs (prompts come later)."""

    indices: list[int]
    latents: object
    noise: object
    timesteps: object
    rng: random.Random  # for the recipe's own choices (templates), after the flips


class LatentCache:
    def __init__(self, info, options, noise_scheduler):
        self.info = info
        self.opt = options
        self.noise_scheduler = noise_scheduler
        self.seed = 0
        self._perm_epoch = -1
        self._perm = None

    def encode(self, concept, vae, weight_dtype, autocast: Callable) -> None:
        """Rank 0 encodes each image (and its flip) once; the distributions are broadcast."""
        import torch

        from amxtune_trainer import distributed

        header = None
        if self.info.is_main:
            pixels = torch.stack([torch.from_numpy(p) for p in concept.pixels])
            variants = [pixels] + ([torch.flip(pixels, dims=[3])] if self.opt.random_flip else [])
            means, stds = [], []
            with torch.no_grad(), autocast():
                for variant in variants:
                    for chunk in variant.split(4):
                        dist = vae.encode(chunk.to(weight_dtype)).latent_dist
                        means.append(dist.mean.float())
                        stds.append(dist.std.float())
            n = pixels.shape[0]
            self.mean = torch.cat(means).view(len(variants), n, *means[0].shape[1:])
            self.std = torch.cat(stds).view_as(self.mean)
            self.captions = concept.captions
            self.vae_scale = float(vae.config.scaling_factor)
            header = (tuple(self.mean.shape), self.captions, self.vae_scale)
        shape, captions, scale = distributed.broadcast_object(self.info, header)
        if not self.info.is_main:
            self.mean = torch.empty(shape)
            self.std = torch.empty(shape)
            self.captions = captions
            self.vae_scale = scale
        distributed.broadcast_tensor(self.info, self.mean)
        distributed.broadcast_tensor(self.info, self.std)
        self.num_images = shape[1]

    def image_indices(self, step: int, micro: int) -> list[int]:
        """A DistributedSampler-like walk over shuffled epochs of images x repeats."""
        import torch

        batch, world = self.opt.train_batch_size, self.info.world_size
        length = self.num_images * self.opt.repeats
        first = ((step - 1) * self.opt.gradient_accumulation_steps + micro) * batch * world
        first += self.info.rank * batch
        out = []
        for position in range(first, first + batch):
            epoch = position // length
            if epoch != self._perm_epoch:
                generator = torch.Generator().manual_seed(seed_for(self.seed, "epoch", epoch))
                self._perm = torch.randperm(length, generator=generator)
                self._perm_epoch = epoch
            out.append(int(self._perm[position % length]) % self.num_images)
        return out

    def draw(self, step: int, micro: int, choose_prompts: Callable) -> tuple[Draw, list[str]]:
        """This rank's micro-batch of `step`; `choose_prompts(indices, rng)` picks the prompts
        between the flips and the tensors, so the order of draws never changes."""
        import torch

        seed = seed_for(self.seed, step, micro, self.info.rank)
        generator = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        indices = self.image_indices(step, micro)
        variants = [rng.randrange(self.mean.shape[0]) if self.opt.random_flip else 0
                    for _ in indices]
        prompts = choose_prompts(indices, rng)
        mean, std = self.mean[variants, indices], self.std[variants, indices]
        sample = torch.randn(mean.shape, generator=generator)
        latents = (mean + std * sample) * self.vae_scale
        noise = torch.randn(latents.shape, generator=generator)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(indices),), generator=generator)
        return Draw(indices, latents, noise, timesteps, rng), prompts

    def eval_set(self, count: int) -> Draw:
        """The fixed evaluation set: the same for every run, seed and rank count."""
        import torch

        generator = torch.Generator().manual_seed(EVAL_SEED)
        indices = [j % self.num_images for j in range(count)]
        latents = self.mean[0, indices] * self.vae_scale
        noise = torch.randn(latents.shape, generator=generator)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (count,), generator=generator)
        return Draw(indices, latents, noise, timesteps, random.Random(EVAL_SEED))
