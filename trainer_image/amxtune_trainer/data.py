"""Concept images: discovery, captions, prompt templates and pixel transforms (PIL only).

Only rank 0 reads the data. Every image is decoded and checked up front (a corrupt file is a
UserError before anything is written), transformed to `resolution` (center crop optional),
and returned as float arrays in [-1, 1] for the one-off VAE encode; a horizontally flipped copy
is a separate variant when `random_flip` is on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from amxtune_trainer.errors import UserError

OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]


def templates_for(learnable_property: str) -> list[str]:
    return STYLE_TEMPLATES if learnable_property == "style" else OBJECT_TEMPLATES


def caption_prompt(caption: str, token_text: str) -> str:
    """The placeholder replaces '{}' in a caption, or is prepended when there is none."""
    caption = " ".join(caption.split())
    if "{}" in caption:
        return caption.replace("{}", token_text)
    return f"{token_text} {caption}" if caption else token_text


@dataclass
class ConceptData:
    """Decoded images (one entry per image) and what each contributes to prompts."""

    files: list[Path]
    pixels: list = field(repr=False)  # numpy float32 [3, H, W] in [-1, 1] per image
    captions: list[str | None]


def find_images(folder: Path, extensions: list[str]) -> list[Path]:
    """Image files directly in `folder` whose name ends with one of `extensions`."""
    exts = tuple(e.lower() for e in extensions)
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(exts)
    )


def load_concept(
    folder: str | Path | None,
    resolution: int,
    center_crop: bool,
    extensions: list[str],
    use_captions: bool,
) -> ConceptData:
    """Read and check every image of the concept folder (UserError on any problem)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not folder:
        raise UserError("no training data: set train_data_dir (--train-data-dir)")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"training data folder {folder} does not exist")
    if not any(folder.iterdir()):
        raise UserError(f"training data folder {folder} is empty")
    files = find_images(folder, extensions)
    if not files:
        raise UserError(
            f"training data folder {folder} has no image files ({', '.join(extensions)})"
        )
    pixels, captions = [], []
    for path in files:
        try:
            with Image.open(path) as image:
                image.load()
                rgb = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise UserError(f"cannot read image {path}: {reason}") from None
        if min(rgb.size) < 1:
            raise UserError(f"image {path} is empty")
        rgb = transform(rgb, resolution, center_crop)
        array = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
        pixels.append(np.ascontiguousarray(array.transpose(2, 0, 1)))
        captions.append(read_caption(path) if use_captions else None)
    return ConceptData(files=files, pixels=pixels, captions=captions)


def read_caption(image_path: Path) -> str | None:
    caption_file = image_path.with_suffix(".txt")
    if not caption_file.is_file():
        return None
    try:
        text = caption_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read caption {caption_file}: {error}") from None
    return text or None


def transform(image, resolution: int, center_crop: bool):
    """Square crop (when asked) then bicubic resize to resolution x resolution."""
    from PIL import Image

    if center_crop:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return image


def make_prompt(
    image_index: int, captions: list[str | None], templates: list[str], token_text: str,
    rng: random.Random,
) -> str:
    caption = captions[image_index]
    if caption is not None:
        return caption_prompt(caption, token_text)
    return rng.choice(templates).format(token_text)
