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
