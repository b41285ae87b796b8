"""The sample grids: tiling, enlargement of small samples, column labels."""

from __future__ import annotations

import pytest
from PIL import Image

from amxtune_trainer.images import make_grid

pytestmark = pytest.mark.unit


def test_small_samples_are_enlarged_pixel_for_pixel_under_their_labels():
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    grid = make_grid([red, blue, blue, red], columns=2, labels=["toy", "<robot-toy>"],
                     min_size=128)
    assert grid.size == (256, 14 + 256)
    assert grid.getpixel((127, 14)) == (255, 0, 0) and grid.getpixel((128, 14)) == (0, 0, 255)
    assert grid.getpixel((255, 14 + 255)) == (255, 0, 0)
    band = [grid.getpixel((x, y)) for x in range(128) for y in range(14)]
    assert min(sum(pixel) for pixel in band) < 300  # the label is written (dark on white)
    assert make_grid([red, blue]).size == (128, 64)  # no labels, no enlargement: as before
