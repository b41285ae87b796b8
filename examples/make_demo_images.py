"""Draw the demo concept: a small yellow robot toy, five views (examples/concepts/robot).

The demo cannot download the recipe's "dicoo" images, so it learns this drawn toy instead.
Run it again to regenerate the PNGs: python examples/make_demo_images.py
"""

import random
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).parent / "concepts" / "robot"


def robot(seed: int, size: int = 256) -> Image.Image:
    rng = random.Random(seed)
    sky = tuple(rng.randint(150, 230) for _ in range(3))
    image = Image.new("RGB", (size, size), sky)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, int(size * 0.75), size, size], fill=(194, 178, 128))  # sand
    scale = rng.uniform(0.8, 1.1)
    cx, cy = size // 2 + rng.randint(-30, 30), int(size * 0.55)
    w, h = int(70 * scale), int(80 * scale)
    yellow, dark = (245, 200, 40), (60, 60, 70)
    draw.rectangle([cx - w // 2, cy - h // 2, cx + w // 2, cy + h // 2], fill=yellow)  # body
    # a big head and eyes: at the 64 px the demo trains on, eyes 6 px across are the smallest
    # that toyworld's VAE carries (docs/learning-experiments.md, "Bigger eyes")
    head = int(64 * scale)
    eye = int(12 * scale)
    draw.rectangle([cx - head // 2, cy - h // 2 - head, cx + head // 2, cy - h // 2], fill=yellow)
    for ex in (-1, 1):  # eyes, arms, legs
        draw.ellipse([cx + ex * head // 4 - eye, cy - h // 2 - head // 2 - eye,
                      cx + ex * head // 4 + eye, cy - h // 2 - head // 2 + eye], fill=dark)
        arm = sorted([cx + ex * (w // 2), cx + ex * (w // 2 + 18)])
        draw.rectangle([arm[0], cy - h // 4, arm[1], cy + h // 6], fill=yellow)
        draw.rectangle([cx + ex * w // 4 - 8, cy + h // 2, cx + ex * w // 4 + 8, cy + h // 2 + 25],
                       fill=dark)
    tip = cy - h // 2 - head - 20  # the antenna, thick enough to be a pixel wide at 64 px
    draw.line([cx, cy - h // 2 - head, cx, tip], fill=dark, width=6)
    draw.ellipse([cx - 6, tip - 6, cx + 6, tip + 6], fill=dark)
    return image


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        robot(i).save(OUT / f"{i}.png", optimize=True)
    print(f"wrote 5 images to {OUT}")
