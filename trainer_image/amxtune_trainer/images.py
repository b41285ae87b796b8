"""Small image helpers shared by generation and validation: grids and file names."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from PIL import Image


def make_grid(images: Sequence[Image.Image], columns: int | None = None,
              labels: Sequence[str] | None = None, min_size: int = 0) -> Image.Image:
    """Tile `images` (all resized to the first one's size) row by row on a white canvas;
    `labels` (one per column) are written in a band above the columns. Images smaller than
    `min_size` are enlarged by a whole factor, pixel for pixel (nearest neighbour), so that
    64 px samples stay visible and their labels fit."""
    from PIL import ImageDraw

    if not images:
        raise ValueError("no images to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    factor = max(1, math.ceil(min_size / max(1, min(width, height))))
    width, height = width * factor, height * factor
    band = 14 if labels else 0
    grid = Image.new("RGB", (columns * width, rows * height + band), "white")
    for index, image in enumerate(images):
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.NEAREST if factor > 1
                                 else Image.Resampling.BICUBIC)
        grid.paste(image.convert("RGB"),
                   ((index % columns) * width, band + (index // columns) * height))
    if labels:
        draw = ImageDraw.Draw(grid)
        for column, label in enumerate(labels[:columns]):
            draw.text((column * width + 2, 1), label, fill="black")
    return grid


def slug(text: str, max_length: int = 40) -> str:
    """A file-name-safe short form of a prompt: 'a <cat-toy> at sea' -> 'a-cat-toy-at-sea'."""
    cleaned = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return cleaned[:max_length].rstrip("-") or "image"
