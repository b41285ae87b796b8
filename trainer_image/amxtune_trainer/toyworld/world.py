"""The toy world: one object of a few kinds, colours, sizes and places on a few backgrounds,
drawn with PIL and captioned in plain words ("a big red ball on the left on the grass").

Everything is deterministic from a seed (`scene(seed)`, `render(scene)`), so the pretraining
data set is a seed and a count, not files. The yellow robot of examples/concepts is not in
this world: its nearest kind, the doll, has a round head and no antenna, as a real model knows
figures and toys but not the user's one. The robot's square head, antenna and block arms are
what textual inversion must learn.
Bump DATA_VERSION when drawings or captions change (the model's manifest records it).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

DATA_VERSION = 7
IMAGE_SIZE = 64

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (240, 200, 40),
    "orange": (240, 130, 30),
    "purple": (130, 50, 170),
    "white": (240, 240, 240),
    "black": (30, 30, 35),
}
# name -> (sky or wall, ground or floor)
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "grass": ((150, 200, 240), (70, 150, 60)),
    "beach": ((185, 215, 235), (215, 195, 135)),
    "snow": ((170, 180, 195), (240, 244, 248)),
    "table": ((225, 215, 190), (140, 95, 60)),
}
KINDS = ("ball", "box", "cone", "star", "bottle", "snowman", "stool", "doll")
SIZES = {"small": 0.75, "": 1.0, "big": 1.2}  # "" is the unnamed middle size
PLACES = {"on the left": -1, "": 0, "on the right": 1}
# The textual-inversion prompt templates' framing, so that its words mean nothing here either.
FRAMES = (
    "{}", "{}", "{}", "a photo of {}", "a rendering of {}", "a cropped photo of {}",
    "a close-up photo of {}", "a bright photo of {}", "a dark photo of {}", "a good photo of {}",
    "a photo of my {}", "a rendition of {}", "a picture of {}",
)
DETAIL = COLORS["black"]  # eyes and legs
GENERIC_KIND = "toy"  # stands for any kind in some captions


@dataclass(frozen=True)
class Scene:
    kind: str
    color: str
    size: str
    place: str
    background: str
    seed: int  # jitter: sky tint, horizon, exact size and position

    def words(self) -> str:
        """The scene in plain words, every attribute named."""
        parts = [w for w in (self.size, self.color, self.kind) if w]
        text = "a " + " ".join(parts)
        if self.place:
            text += f" {self.place}"
        return f"{text} on the {self.background}"


def scene(seed: int) -> Scene:
    rng = random.Random(seed)
    return Scene(
        kind=rng.choice(KINDS), color=rng.choice(list(COLORS)), size=rng.choice(list(SIZES)),
        place=rng.choice(list(PLACES)), background=rng.choice(list(BACKGROUNDS)),
        seed=rng.randrange(1 << 30),
    )


def caption(item: Scene, seed: int) -> str:
    """A caption that names the scene, sometimes leaving an attribute out (then any value fits)
    or calling the object a toy, in one of the framings the prompt templates use."""
    rng = random.Random(seed)
    kind = GENERIC_KIND if rng.random() < 0.15 else item.kind
    color = item.color if rng.random() < 0.9 else ""
    size = item.size if rng.random() < 0.9 else ""
    place = item.place if rng.random() < 0.9 else ""
    words = " ".join(w for w in (size, color, kind) if w)
    article = "the" if rng.random() < 0.3 else ("an" if words[0] in "aeiou" else "a")
    text = f"{article} {words}" + (f" {place}" if place else "")
    if rng.random() < 0.85:
        text += f" on the {item.background}"
    return rng.choice(FRAMES).format(text)


def _shade(color: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(v * factor))) for v in color)  # type: ignore[return-value]


def _eyes(draw, cx: float, y: float, apart: float, radius: float) -> None:
    """Two dark eyes at height y, `apart` left and right of cx."""
    for ex in (cx - apart, cx + apart):
        draw.ellipse([ex - radius, y - radius, ex + radius, y + radius], fill=DETAIL)


def render(item: Scene, size: int = IMAGE_SIZE):
    """The scene as a PIL image (drawn at 4x and downsampled, so edges are smooth)."""
    from PIL import Image, ImageDraw

    rng = random.Random(item.seed)
    scale = 4
    big = size * scale
    sky, ground = BACKGROUNDS[item.background]
    sky = tuple(max(0, min(255, v + rng.randint(-14, 14))) for v in sky)
    image = Image.new("RGB", (big, big), sky)
    draw = ImageDraw.Draw(image)
    horizon = big * rng.uniform(0.62, 0.76)
    draw.rectangle([0, horizon, big, big], fill=ground)
    radius = big * 0.18 * SIZES[item.size] * rng.uniform(0.9, 1.1)
    cx = big / 2 + PLACES[item.place] * big * 0.24 + rng.uniform(-0.05, 0.05) * big
    cy = horizon - radius * 1.05 + rng.uniform(-0.03, 0.06) * big
    color = COLORS[item.color]
    r = radius
    if item.kind == "ball":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        draw.ellipse([cx - r * 0.55, cy - r * 0.6, cx - r * 0.1, cy - r * 0.2],
                     fill=_shade(color, 1.3))
    elif item.kind == "box":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
        draw.rectangle([cx - r, cy - r, cx + r, cy - r * 0.6], fill=_shade(color, 1.25))
    elif item.kind == "cone":
        draw.polygon([(cx, cy - r * 1.25), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif item.kind == "star":
        points = []
        for i in range(10):
            angle = -math.pi / 2 + i * math.pi / 5
            reach = r * (1.2 if i % 2 == 0 else 0.5)
            points.append((cx + reach * math.cos(angle), cy + reach * math.sin(angle)))
        draw.polygon(points, fill=color)
    elif item.kind == "bottle":
        draw.rectangle([cx - r * 0.45, cy - r * 0.45, cx + r * 0.45, cy + r], fill=color)
        draw.rectangle([cx - r * 0.2, cy - r * 1.2, cx + r * 0.2, cy - r * 0.45], fill=color)
    elif item.kind == "snowman":  # a ball on a ball, two dark eyes
        low, high = r * 0.62, r * 0.42
        base = cy + r - low
        draw.ellipse([cx - low, base - low, cx + low, base + low], fill=color)
        top = base - low - high * 0.8
        draw.ellipse([cx - high, top - high, cx + high, top + high], fill=color)
        _eyes(draw, cx, top - high * 0.15, high * 0.4, max(1.5, high * 0.18))
    elif item.kind == "stool":  # a seat on two dark legs
        draw.rectangle([cx - r, cy - r * 0.35, cx + r, cy + r * 0.15], fill=color)
        for left in (cx - r * 0.8, cx + r * 0.45):
            draw.rectangle([left, cy + r * 0.15, left + r * 0.35, cy + r], fill=DETAIL)
    elif item.kind == "doll":  # a round head with two dark eyes, a body with arms, two legs
        leg_top = cy + r * 0.45
        for left in (cx - r * 0.4, cx + r * 0.12):
            draw.rectangle([left, leg_top, left + r * 0.28, cy + r], fill=DETAIL)
        draw.rectangle([cx - r * 0.5, cy - r * 0.45, cx + r * 0.5, leg_top], fill=color)
        draw.rectangle([cx - r * 0.9, cy - r * 0.4, cx + r * 0.9, cy - r * 0.1], fill=color)
        head = r * 0.55
        top = cy - r * 0.45 - head * 0.9
        draw.ellipse([cx - head, top - head, cx + head, top + head], fill=color)
        # eyes about 4 px across at 64 px: smaller ones do not survive the VAE
        # (docs/learning-experiments.md)
        _eyes(draw, cx, top - head * 0.05, head * 0.45, head * 0.3)
    else:  # pragma: no cover - KINDS is closed
        raise ValueError(item.kind)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def vocabulary() -> list[str]:
    """Every word a caption can use (the toyworld tokenizer makes each one token)."""
    words = {GENERIC_KIND, "a", "an", "the", "on"}
    words.update(COLORS, BACKGROUNDS, KINDS)
    words.update(w for name in (*SIZES, *PLACES) for w in name.split())
    words.update(w for frame in FRAMES for w in frame.replace("{}", "").split())
    return sorted(words)
