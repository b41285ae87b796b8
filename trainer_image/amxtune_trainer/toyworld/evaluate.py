"""Does the pretrained model draw what its prompts say? Colour, shape and background, counted.

`evaluate(folder)` renders a fixed set of prompts of the world's vocabulary with the model
(PyTorch, fp32, fixed seeds) and checks each image with similarity.describe(): the object's
nearest world colour, whether it is round (balls), square (boxes) or tall (bottles), and the
ground's nearest background. The fractions that match go into the model's manifest and are
checked by the tests.
"""

from __future__ import annotations

from pathlib import Path

# (prompt, colour, shape, background)
CHECKS = [
    ("a red ball on the grass", "red", "round", "grass"),
    ("a blue box on the snow", "blue", "square", "snow"),
    ("a green bottle on the table", "green", "tall", "table"),
    ("a yellow ball on the beach", "yellow", "round", "beach"),
    ("a purple box on the grass", "purple", "square", "grass"),
    ("an orange bottle on the snow", "orange", "tall", "snow"),
    ("a white ball on the table", "white", "round", "table"),
    ("a black box on the beach", "black", "square", "beach"),
]
GUIDANCE = 5.0
STEPS = 25


def render(folder: Path | str, prompts: list[str], per_prompt: int, seed: int = 0,
           guidance: float = GUIDANCE, steps: int = STEPS) -> list:
    """`per_prompt` images of each prompt (PyTorch fp32), the same seeds for every prompt."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for prompt in prompts:
        generator = torch.Generator().manual_seed(seed)
        images += pipeline([prompt] * per_prompt, num_inference_steps=steps,
                           guidance_scale=guidance, generator=generator, height=64,
                           width=64).images
    return images


def evaluate(folder: Path | str, per_prompt: int = 4, seed: int = 0) -> dict:
    from amxtune_trainer.toyworld.similarity import describe

    images = render(folder, [c[0] for c in CHECKS], per_prompt, seed)
    hits = {"color": 0, "shape": 0, "background": 0}
    rows = []
    for index, (prompt, colour, shape, background) in enumerate(CHECKS):
        for image in images[index * per_prompt:(index + 1) * per_prompt]:
            seen = describe(image)
            hits["color"] += seen["color"] == colour
            hits["shape"] += seen["shape"] == shape
            hits["background"] += seen["background"] == background
            rows.append({"prompt": prompt, "color": seen["color"], "shape": seen["shape"],
                         "background": seen["background"]})
    total = len(CHECKS) * per_prompt
    return {"images": total, "seed": seed, "guidance_scale": GUIDANCE, "steps": STEPS,
            **{f"{k}_match": round(v / total, 3) for k, v in hits.items()},
            "rows": rows, "grid": images}


def reconstruction(folder: Path | str, concept_dir: Path | str, scenes: int = 16) -> dict:
    """How well the model's VAE carries a concept's images, against the world's own scenes.

    Fine-tuning (textual inversion or LoRA) only moves what the UNet predicts in latent space;
    what the VAE cannot encode and decode, no fine-tuning can draw. The mean absolute error is
    in pixel units of [0, 1], each image encoded to its latent mean and decoded, at 64 px as
    the trainer sees it (`load_concept`). Returns both errors and the pairs (original, decoded)
    for a grid. A missing or empty concept folder is a UserError, before any weights load."""
    import numpy as np

    from amxtune_api.training import TrainingOptions
    from amxtune_trainer.data import load_concept
    from amxtune_trainer.toyworld import world

    concept = load_concept(concept_dir, world.IMAGE_SIZE, center_crop=False,
                           extensions=TrainingOptions().image_extensions, use_captions=False)
    import torch
    from diffusers import AutoencoderKL

    from amxtune_trainer.toyworld.pretrain import scene_batch

    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae").eval()
    concept_pixels = torch.from_numpy(np.stack(concept.pixels))
    scene_pixels, _ = scene_batch(list(range(10**6, 10**6 + scenes)))  # not the UNet's seeds

    def roundtrip(pixels):
        with torch.no_grad():
            decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
        return decoded, float((decoded - pixels).abs().mean() / 2)

    concept_decoded, concept_error = roundtrip(concept_pixels)
    _, scene_error = roundtrip(scene_pixels)

    def image(pixels):
        from PIL import Image

        array = ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        return Image.fromarray(array)

    pairs = [image(p) for p in concept_pixels] + [image(p) for p in concept_decoded]
    return {"concept_images": len(concept.pixels), "concept_error": round(concept_error, 4),
            "scene_error": round(scene_error, 4), "grid": pairs}
