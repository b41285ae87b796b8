"""How much images look like a concept, and what a toy-world image shows: image statistics only.

The toy world's pictures are flat colours on a two-part background (sky or wall above, ground
below), so a few statistics describe them: the background is the colour each row mostly has,
the object is what differs from it, and the object's colour, size, outline and dark parts
tell what it is. No downloaded network is needed.

- `features(image)`: the object's main (median) colour, area, height/width, how much of its bounding
  box it fills, how much of it is dark, and where its mass sits (top/middle/bottom thirds);
- `concept_similarity(images, concept_images)`: 1.0 when the images' features fall where the
  concept images' do, towards 0 as they move away (each feature measured in units of its
  spread across the concept images, with a floor);
- `describe(image)`: the nearest world colour and whether the object is round, square-ish or
  tall, and the background's name, for checking that prompts render what they say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from amxtune_trainer.toyworld import world

SIDE = 64
# Feature spreads below which concept images are not allowed to look "identical": generated
# images are blurrier and vary more than five drawings of one toy.
FLOORS = np.array([0.08, 0.08, 0.08, 0.04, 0.25, 0.08, 0.08, 0.12, 0.12, 0.12])
FEATURE_NAMES = ("red", "green", "blue", "area", "log_height_over_width", "fill", "dark",
                 "top", "middle", "bottom")


@dataclass
class ObjectView:
    mask: np.ndarray  # bool (SIDE, SIDE)
    pixels: np.ndarray  # float (SIDE, SIDE, 3) in [0, 1]
    background: np.ndarray  # per-row colour (SIDE, 3)


def _as_array(image) -> np.ndarray:
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


def segment(image) -> ObjectView:
    """Separate the object from a background of horizontal bands (row medians)."""
    pixels = _as_array(image)
    # the object covers less than half of each row (all but a big star's widest rows)
    background = np.median(pixels, axis=1)
    distance = np.linalg.norm(pixels - background[:, None, :], axis=2)
    mask = distance > 0.15
    if mask.sum() < 4:  # nothing stands out: take the pixels that differ most
        mask = distance >= np.quantile(distance, 0.98)
    # generated pictures have specks and a soft horizon: the object is the biggest blob
    return ObjectView(largest_blob(mask), pixels, background)


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of `mask`."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def features(image) -> np.ndarray:
    view = segment(image)
    mask = view.mask
    rows, cols = np.nonzero(mask)
    # the median, not the mean: an object's main colour, not mixed with its dark eyes or legs
    colour = np.median(view.pixels[mask], axis=0)
    height = rows.max() - rows.min() + 1
    width = cols.max() - cols.min() + 1
    area = mask.sum() / mask.size
    fill = mask.sum() / float(height * width)
    luminance = view.pixels[mask] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    dark = float((luminance < 0.3).mean())
    thirds = np.array_split(np.arange(rows.min(), rows.max() + 1), 3)
    mass = np.array([np.isin(rows, part).mean() for part in thirds])
    return np.array([*colour, area, math.log(height / width), fill, dark, *mass],
                    dtype=np.float64)


def concept_similarity(images, concept_images) -> float:
    """Mean over `images` of exp(-d^2 / 2), d the RMS distance of the image's features from
    the concept images' mean, each feature in units of the concept's spread (with FLOORS)."""
    reference = np.stack([features(image) for image in concept_images])
    centre = reference.mean(axis=0)
    spread = np.maximum(reference.std(axis=0), FLOORS)
    scores = []
    for image in images:
        distance = (features(image) - centre) / spread
        scores.append(math.exp(-0.5 * float(np.mean(distance ** 2))))
    return float(np.mean(scores))


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(world.COLORS)
    table = np.array([world.COLORS[n] for n in names], dtype=np.float64) / 255.0
    return names[int(np.argmin(np.linalg.norm(table - rgb, axis=1)))]


def describe(image) -> dict:
    """What a rendered toy-world image shows, as far as the statistics tell."""
    view = segment(image)
    values = features(image)
    ratio = math.exp(values[4])
    if values[5] < 0.87 and 0.75 < ratio < 1.35:
        shape = "round"
    elif ratio >= 1.35:
        shape = "tall"
    else:
        shape = "square"
    ground = view.background[-8:].mean(axis=0)
    grounds = {name: np.array(colours[1], dtype=np.float64) / 255.0
               for name, colours in world.BACKGROUNDS.items()}
    background = min(grounds, key=lambda name: float(np.linalg.norm(grounds[name] - ground)))
    return {"color": nearest_colour(values[:3]), "shape": shape, "background": background,
            "features": dict(zip(FEATURE_NAMES, (round(float(v), 3) for v in values),
                                 strict=True))}
