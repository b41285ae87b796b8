"""Small image helpers shared by generation and validation: grids and file names."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from PIL import Image


def make_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile `images` (all resized to the first one's size) row by row on a white canvas."""
    if not images:
        raise ValueError("no images to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        if image.size != (width, height):
            image = image.resize((width, height))
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return grid


def slug(text: str, max_length: int = 40) -> str:
    """A file-name-safe short form of a prompt: 'a <cat-toy> at sea' -> 'a-cat-toy-at-sea'."""
    cleaned = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return cleaned[:max_length].rstrip("-") or "image"
