"""Data discovery, captions, transforms, and how the new vectors are initialised."""

from __future__ import annotations

import random

import pytest
import torch
from trainer_helpers import make_images

pytestmark = pytest.mark.trainer


def test_only_listed_extensions_count_and_captions_replace_templates(tmp_path):
    from amxtune_trainer.data import OBJECT_TEMPLATES, load_concept, make_prompt

    folder = make_images(tmp_path / "d", count=3)  # toy-0.jpg, toy-1.png, toy-2.jpg
    (folder / "toy-0.txt").write_text("a {} on a red beach\n")
    (folder / "toy-1.txt").write_text("sitting on a chair")
    (folder / "notes.md").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    concept = load_concept(folder, 32, True, [".png"], use_captions=True)
    assert [p.name for p in concept.files] == ["toy-1.png"]
    assert concept.pixels[0].shape == (3, 32, 32)
    assert concept.pixels[0].min() >= -1.0 and concept.pixels[0].max() <= 1.0
    concept = load_concept(folder, 16, False, [".PNG", "jpg"], use_captions=True)
    assert [p.name for p in concept.files] == ["toy-0.jpg", "toy-1.png", "toy-2.jpg"]
    rng = random.Random(0)
    prompts = [make_prompt(i, concept.captions, OBJECT_TEMPLATES, "<t> <t>_1", rng)
               for i in range(3)]
    assert prompts[0] == "a <t> <t>_1 on a red beach"
    assert prompts[1] == "<t> <t>_1 sitting on a chair"
    assert prompts[2] in [t.format("<t> <t>_1") for t in OBJECT_TEMPLATES]


def test_center_crop_keeps_the_middle_and_resize_squares(tmp_path):
    from PIL import Image

    from amxtune_trainer.data import transform

    image = Image.new("RGB", (300, 100), (0, 0, 0))
    image.paste((255, 255, 255), (100, 0, 200, 100))  # white middle third
    cropped = transform(image, 64, center_crop=True)
    assert cropped.size == (64, 64) and cropped.getpixel((32, 32)) == (255, 255, 255)
    resized = transform(image, 64, center_crop=False)
    assert resized.size == (64, 64) and resized.getpixel((2, 32)) == (0, 0, 0)


def test_initializer_phrase_is_spread_over_the_vectors_in_order():
    from amxtune_trainer.embedding import initial_vectors

    weight = torch.arange(10, dtype=torch.float32).unsqueeze(1).repeat(1, 4)
    assert initial_vectors(weight, [7], 3)[:, 0].tolist() == [7, 7, 7]
    assert initial_vectors(weight, [2, 5], 4)[:, 0].tolist() == [2, 2, 5, 5]
    assert initial_vectors(weight, [1, 2, 3], 3)[:, 0].tolist() == [1, 2, 3]
    assert initial_vectors(weight, [0, 2, 4, 6], 2)[:, 0].tolist() == [1, 5]  # means


def test_initial_embedding_files_of_every_common_format(tmp_path):
    from safetensors.torch import save_file

    from amxtune_trainer.embedding import read_embedding_file
    from amxtune_trainer.errors import UserError

    vectors = torch.randn(2, 8)
    save_file({"<x>": vectors}, str(tmp_path / "diffusers.safetensors"))
    torch.save({"string_to_param": {"*": vectors}, "name": "x"}, tmp_path / "a1111.pt")
    torch.save({"<x>": vectors}, tmp_path / "learned_embeds.bin")
    for name in ("diffusers.safetensors", "a1111.pt", "learned_embeds.bin"):
        assert torch.equal(read_embedding_file(tmp_path / name, 2, 8), vectors)
    with pytest.raises(UserError, match=r"expected \[3, 8\]"):
        read_embedding_file(tmp_path / "a1111.pt", 3, 8)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read initial embedding"):
        read_embedding_file(tmp_path / "junk.pt", 2, 8)


def test_spliced_embedding_substitutes_only_the_new_ids():
    from amxtune_trainer.embedding import _make_module_class

    base = torch.nn.Embedding(6, 3)
    base.requires_grad_(False)
    vectors = torch.full((2, 3), 9.0)
    module = _make_module_class()(base, [6, 7], vectors)
    ids = torch.tensor([[0, 6, 5, 7]])
    out = module(ids)
    assert torch.equal(out[0, 0], base.weight[0]) and torch.equal(out[0, 2], base.weight[5])
    assert torch.equal(out[0, 1], vectors[0]) and torch.equal(out[0, 3], vectors[1])
    out.sum().backward()
    assert module.vectors.grad.tolist() == [[1.0] * 3, [1.0] * 3]
    assert base.weight.grad is None
