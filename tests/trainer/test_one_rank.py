"""One-rank training on the tiny model: learning, frozen rows, outputs, progress contract."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import TOKEN, events

pytestmark = pytest.mark.trainer


def test_progress_lines_follow_the_contract(trained):
    lines = events(trained["stdout"])
    progress = [e for e in lines if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [5, 10, 15, 20, 25, 30, 35, 40]
    for event in progress:
        assert set(event) == {"event", "step", "max_steps", "loss", "lr",
                              "samples_per_second", "eta_seconds"}
        assert event["max_steps"] == 40
        assert event["samples_per_second"] > 0 and event["eta_seconds"] >= 0
    assert progress[-1]["eta_seconds"] == 0
    completed = lines[-1]
    assert completed["event"] == "completed"
    assert set(completed) == {"event", "method", "output_dir", "learned_embeds", "steps",
                              "final_loss", "wall_seconds"}
    assert completed["method"] == "textual-inversion"
    assert completed["steps"] == 40
    assert completed["learned_embeds"].endswith("learned_embeds.safetensors")
    # Only JSON goes to stdout (stdout is not a terminal here: no progress bar either).
    assert all(line.startswith("{") for line in trained["stdout"].splitlines())


def test_loss_on_the_fixed_evaluation_set_goes_down(trained):
    points = trained["metrics"]["eval_loss"]
    assert [p["step"] for p in points] == [0, 10, 20, 30, 40]  # start, checkpoints, end
    assert points[-1]["loss"] < points[0]["loss"] - 1e-4, points


def test_output_folder_has_every_file(trained):
    out = trained["out"]
    for name in ("learned_embeds.safetensors", "learned_embeds.pt", "metrics.json", "loss.png",
                 "pipeline/model_index.json", "validation/step-40/grid.png",
                 "validation/step-40/image-0.png", "validation/step-40/image-1.png"):
        assert (out / name).is_file(), name
    # Pruned to the limit, newest kept; no temporary leftovers anywhere.
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-30", "checkpoint-40"]
    assert not [p for p in out.rglob(".*") if p.name.startswith(".")]
    embeds = load_file(str(out / "learned_embeds.safetensors"))
    assert list(embeds) == [TOKEN]
    assert embeds[TOKEN].shape == (2, 32) and embeds[TOKEN].dtype == torch.float32
    a1111 = torch.load(out / "learned_embeds.pt", weights_only=False)
    assert torch.equal(a1111["string_to_param"]["*"], embeds[TOKEN])
    single = load_file(str(out / "learned_embeds_a1111.safetensors"))  # A1111 / ComfyUI
    assert list(single) == ["emb_params"] and torch.equal(single["emb_params"], embeds[TOKEN])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 40 and metrics["world_size"] == 1
    assert metrics["allreduce_bytes_per_step"] == 0
    from amxtune_trainer.runtime import find_allocator

    if find_allocator() and not os.environ.get("LD_PRELOAD"):  # the trainer preloaded it
        assert find_allocator() in metrics["ld_preload"]
    assert metrics["omp_wait_policy"]


def test_frozen_rows_stay_bit_identical_and_new_rows_are_the_learned_vectors(trained,
                                                                            tiny_model):
    base = load_file(str(tiny_model / "text_encoder" / "model.safetensors"))
    key = next(k for k in base if k.endswith("token_embedding.weight"))
    saved = load_file(str(trained["out"] / "pipeline" / "text_encoder" / "model.safetensors"))
    matrix = saved[key]
    rows = base[key].shape[0]
    assert matrix.dtype == torch.float32
    assert matrix.shape[0] == rows + 2
    assert torch.equal(matrix[:rows], base[key])
    learned = load_file(str(trained["out"] / "learned_embeds.safetensors"))[TOKEN]
    assert torch.equal(matrix[rows:], learned)
    from transformers import CLIPTokenizer

    toy = CLIPTokenizer.from_pretrained(str(tiny_model / "tokenizer")).encode(
        "toy", add_special_tokens=False)
    assert len(toy) == 1
    assert not torch.allclose(learned[0], base[key][toy[0]])  # it was trained away from "toy"


def prepared_trainer(concept_dir, tmp_path, *options_args: str):
    """An in-process textual inversion of placeholder <x> from "red cat" on the tiny model,
    prepared to train; one thread."""
    from amxtune_trainer import distributed, options
    from amxtune_trainer.cli import build_parser
    from amxtune_trainer.recipes.textual_inversion import TextualInversion as Trainer

    torch.set_num_threads(1)
    args = build_parser("textual-inversion").parse_args([
        "textual-inversion", "--model", "tiny", "--train-data-dir", str(concept_dir),
        "--output-dir", str(tmp_path / "out"), "--placeholder-token", "<x>",
        "--initializer-token", "red cat", "--resolution", "64", "--seed", "1", *options_args,
    ])
    trainer = Trainer(options.config_from_args(args), distributed.DistInfo())
    trainer.prepare()
    return trainer


def test_only_the_new_vectors_are_trainable_and_frozen_rows_never_change(tiny_model,
                                                                         concept_dir, tmp_path):
    trainer = prepared_trainer(concept_dir, tmp_path, "--num-vectors", "3",
                               "--learning-rate", "0.5", "--lr-warmup-steps", "0",
                               "--mixed-precision", "bf16")
    frozen = trainer.embedding.base.weight.detach().clone()
    trainable = [n for n, p in trainer.text_encoder.named_parameters() if p.requires_grad]
    trainable += [n for n, p in trainer.unet.named_parameters() if p.requires_grad]
    assert trainable == ["text_model.embeddings.token_embedding.vectors"]
    before = trainer.vectors.detach().clone()
    assert before.shape == (3, 32)
    for step in (1, 2, 3):
        trainer.train_step(step)
    assert torch.equal(trainer.embedding.base.weight, frozen)  # bit-identical
    assert trainer.embedding.base.weight.grad is None
    assert not torch.equal(trainer.vectors.detach(), before)
    # "red cat" spread over 3 vectors: red, red, cat (in order).
    ids = trainer.tokenizer.encode("red cat", add_special_tokens=False)
    assert len(ids) == 2


def test_outputs_load_into_a_diffusers_pipeline_and_render(trained, tiny_model):
    from diffusers import StableDiffusionPipeline

    for source in ("embeds", "pipeline"):
        if source == "embeds":
            pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
            pipe.load_textual_inversion(str(trained["out"] / "learned_embeds.safetensors"))
        else:
            pipe = StableDiffusionPipeline.from_pretrained(str(trained["out"] / "pipeline"),
                                                           safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        assert TOKEN in pipe.tokenizer.get_vocab() and f"{TOKEN}_1" in pipe.tokenizer.get_vocab()
        image = pipe(f"a photo of a {TOKEN}", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
        assert image.size == (64, 64)
        # The new token changes the conditioning (it is really used).
        ids = pipe.tokenizer(pipe.maybe_convert_prompt(f"a {TOKEN}", pipe.tokenizer)).input_ids
        assert pipe.tokenizer.convert_tokens_to_ids(f"{TOKEN}_1") in ids


def test_the_placeholder_before_training_renders_as_its_initializer_words(tiny_model,
                                                                          concept_dir, tmp_path):
    """The concept similarity's "before" row must show what the initializer words draw: with
    one vector per word, the untrained placeholder and the words are the same conditioning, so
    the same seed gives the same pixels. (A prompt expanded to all vectors before the pipeline
    expanded it again rendered stray tokens.)"""
    import numpy as np

    from amxtune_trainer import samples

    trainer = prepared_trainer(concept_dir, tmp_path, "--num-vectors", "2",
                               "--mixed-precision", "no", "--validation-inference-steps", "4")
    placeholder = samples.render(trainer, "a photo of a <x>", 1, seed=3)[0]
    words = samples.render(trainer, "a photo of a red cat", 1, seed=3)[0]
    other = samples.render(trainer, "a photo of a blue dog", 1, seed=3)[0]
    assert np.array_equal(np.asarray(placeholder), np.asarray(words))
    assert not np.array_equal(np.asarray(other), np.asarray(words))  # the text does matter
