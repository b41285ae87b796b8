"""OpenVINO export and generation of the tiny model on the CPU."""

import json

import numpy as np
import pytest

from amxtune_api.export import GenerationOptions
from amxtune_trainer.cli import main

pytestmark = pytest.mark.openvino

TOKEN = "<cat-toy>"  # as in conftest.py
SIZE = 64

# OpenVINO (fp32 inference precision; the CPU plugin's default would be bf16 on AMX machines)
# vs PyTorch fp32, same scheduler (PNDM from the folder) and the same initial latents, 5 steps:
# images in [0, 1] must agree to 1e-4 per pixel and 1e-5 on average (measured: 2.7e-6 max,
# 2.2e-7 mean). The residue is the float summation order of the OpenVINO CPU plugin vs oneDNN.
MAX_ABS_TOLERANCE = 1e-4
MEAN_ABS_TOLERANCE = 1e-5


def _latents(batch: int, same: bool = False):
    import torch

    generator = torch.Generator().manual_seed(123)
    if same:
        return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=generator).repeat(batch, 1, 1, 1)
    return torch.randn(batch, 4, SIZE // 8, SIZE // 8, generator=generator)


def _shape(batch: int) -> dict:
    return {"batch_size": batch, "height": SIZE, "width": SIZE, "num_images_per_prompt": 1}


def _no_staging_left(folder) -> bool:
    return not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]


def test_export_reloads_with_its_static_shape_and_the_token(ov_fp32):
    from amxtune_trainer.export import load_openvino_pipeline, read_export_metadata
    from amxtune_trainer.generate import openvino_static_shape

    pipe = load_openvino_pipeline(ov_fp32, compile=False)
    assert not pipe.is_dynamic
    assert openvino_static_shape(pipe) == _shape(2)
    assert TOKEN in pipe.tokenizer.get_vocab() and f"{TOKEN}_1" in pipe.tokenizer.get_vocab()
    metadata = read_export_metadata(ov_fp32)
    assert metadata["placeholder_tokens"] == [TOKEN, f"{TOKEN}_1"]
    assert metadata["options"]["weightFormat"] == "fp32"
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        assert (ov_fp32 / "tokenizer" / name).is_file()
    assert _no_staging_left(ov_fp32)


def test_generate_writes_pngs_grid_and_json(ov_fp32, tmp_path):
    from PIL import Image

    output = tmp_path / "samples"
    argv = ["generate", "--model", str(ov_fp32), "--output", str(output),
            "--prompt", f"a photo of {TOKEN}", "--prompt", "a photo", "--prompt", "a toy",
            "--prompt", "a cat", "--num-inference-steps", "3", "--seed", "7"]
    assert main(argv) == 0
    names = sorted(p.name for p in output.iterdir())
    assert names == ["000-a-photo-of-cat-toy.png", "001-a-photo.png", "002-a-toy.png",
                     "003-a-cat.png", "generation.json", "grid.png"]
    assert Image.open(output / "000-a-photo-of-cat-toy.png").size == (SIZE, SIZE)
    assert Image.open(output / "grid.png").size == (2 * SIZE, 2 * SIZE)
    metadata = json.loads((output / "generation.json").read_text())
    assert metadata["backend"] == "openvino"
    assert metadata["num_images"] == 4 and len(metadata["batch_seconds"]) == 2
    assert metadata["seconds_per_image"] > 0
    assert metadata["settings"]["numInferenceSteps"] == 3
    assert [i["seed"] for i in metadata["images"]] == [7, 7, 8, 8]
    assert metadata["images"][0]["file"] == "000-a-photo-of-cat-toy.png"
    assert _no_staging_left(output)


def test_openvino_fp32_matches_pytorch_fp32(ov_fp32, tiny_model, learned_embeds):
    from amxtune_trainer.export import load_openvino_pipeline
    from amxtune_trainer.generate import load_pytorch_pipeline, render

    options = GenerationOptions(prompts=[f"a {TOKEN} photo", "a photo"], num_inference_steps=5)
    latents = _latents(2)
    ov = load_openvino_pipeline(ov_fp32, precision="fp32")
    pt = load_pytorch_pipeline(str(tiny_model), str(learned_embeds))
    assert type(ov.scheduler) is type(pt.scheduler)
    ov_images = np.stack(render(ov, options, _shape(2), backend="openvino", latents=latents,
                                output_type="np").images)
    pt_images = np.stack(render(pt, options, _shape(2), backend="pytorch", latents=latents,
                                output_type="np").images)
    assert ov_images.shape == pt_images.shape == (2, SIZE, SIZE, 3)
    assert pt_images.std() > 0.02  # not a flat image: the comparison means something
    difference = np.abs(ov_images - pt_images)
    print(f"OpenVINO vs PyTorch: max {difference.max():.2e}, mean {difference.mean():.2e}")
    assert difference.max() < MAX_ABS_TOLERANCE, difference.max()
    assert difference.mean() < MEAN_ABS_TOLERANCE, difference.mean()


def test_placeholder_token_changes_the_image(ov_fp32):
    from amxtune_trainer.export import load_openvino_pipeline
    from amxtune_trainer.generate import render

    pipe = load_openvino_pipeline(ov_fp32, precision="fp32")
    same_noise = _latents(2, same=True)

    def images(prompts):
        options = GenerationOptions(prompts=prompts, num_inference_steps=5)
        return render(pipe, options, _shape(2), backend="openvino", latents=same_noise,
                      output_type="np").images

    control = images(["a photo", "a photo"])
    assert np.abs(control[0] - control[1]).max() < 1e-6  # same prompt + noise: same image
    with_token, without = images([f"a photo of {TOKEN}", "a photo of"])
    # The random-weight tiny model is weakly conditioned: the token moves pixels by ~6e-3 on
    # average (measured), far above the control's 0 and the OpenVINO/PyTorch residue.
    assert np.abs(with_token - without).mean() > 2e-3


def test_int8_weights_are_smaller_and_still_render(ov_int8, ov_fp32):
    from amxtune_trainer.export import load_openvino_pipeline, weight_bytes
    from amxtune_trainer.generate import render

    int8, fp32 = weight_bytes(ov_int8), weight_bytes(ov_fp32)
    assert int8["unet"] < 0.5 * fp32["unet"], (int8, fp32)
    assert sum(int8.values()) < 0.6 * sum(fp32.values()), (int8, fp32)
    pipe = load_openvino_pipeline(ov_int8)
    assert TOKEN in pipe.tokenizer.get_vocab()  # came with the full pipeline folder
    options = GenerationOptions(prompts=[f"a {TOKEN}"], num_inference_steps=3)
    image = render(pipe, options, _shape(1), backend="openvino", output_type="np").images[0]
    assert image.shape == (SIZE, SIZE, 3) and np.isfinite(image).all() and image.std() > 0.01


def test_fp16_weights_are_half_the_size_and_render(full_pipeline, ov_fp32, tmp_path):
    from amxtune_api.export import OpenVINOExportOptions
    from amxtune_trainer.export import export_openvino, load_openvino_pipeline, weight_bytes
    from amxtune_trainer.generate import render

    output = tmp_path / "openvino"
    options = OpenVINOExportOptions(height=SIZE, width=SIZE, weight_format="fp16")
    metadata = export_openvino(str(full_pipeline), output, options)
    fp16, fp32 = metadata["weight_bytes"], weight_bytes(ov_fp32)
    assert 0.4 * fp32["unet"] < fp16["unet"] < 0.6 * fp32["unet"], (fp16, fp32)
    pipe = load_openvino_pipeline(output)
    options = GenerationOptions(prompts=[f"a {TOKEN}"], num_inference_steps=3)
    image = render(pipe, options, _shape(1), backend="openvino", output_type="np").images[0]
    assert np.isfinite(image).all() and image.std() > 0.01


def test_int8_full_computes_the_unet_in_int8_and_renders_close_to_fp32(full_pipeline, ov_fp32,
                                                                        tmp_path):
    from amxtune_api.export import OpenVINOExportOptions
    from amxtune_trainer.export import export_openvino, load_openvino_pipeline, weight_bytes
    from amxtune_trainer.generate import render

    output = tmp_path / "openvino"
    options = OpenVINOExportOptions(batch_size=2, height=SIZE, width=SIZE,
                                    weight_format="int8-full")
    metadata = export_openvino(str(full_pipeline), output, options)
    full, fp32 = metadata["weight_bytes"], weight_bytes(ov_fp32)
    assert full["unet"] < 0.5 * fp32["unet"], (full, fp32)
    pipe = load_openvino_pipeline(output, precision="fp32")
    ops = [op.get_type_name() for op in pipe.unet.model.get_ops()]
    # activations quantized: FakeQuantize on the inputs of the convolutions and matmuls, which
    # weight-only int8 has none of
    assert ops.count("FakeQuantize") > 10, ops.count("FakeQuantize")
    assert "FakeQuantize" not in [op.get_type_name() for op in pipe.text_encoder.model.get_ops()]

    options = GenerationOptions(prompts=[f"a {TOKEN}", "a cat"], num_inference_steps=3)
    image = np.stack(render(pipe, options, _shape(2), backend="openvino", output_type="np",
                            latents=_latents(2)).images)
    reference = np.stack(render(load_openvino_pipeline(ov_fp32, precision="fp32"), options,
                                _shape(2), backend="openvino", output_type="np",
                                latents=_latents(2)).images)
    assert np.isfinite(image).all() and image.std() > 0.01
    # measured (tiny model, 3 steps, f32 inference precision, images in [0, 1]): mean 0.0079,
    # max 0.063 (about 2 and 16 levels of 255; the same in two runs); a broken calibration is
    # far off
    difference = np.abs(image - reference)
    assert difference.mean() < 0.025 and difference.max() < 0.25, (difference.mean(),
                                                                   difference.max())


def test_failed_export_leaves_nothing(tiny_model, learned_embeds, tmp_path, monkeypatch):
    from amxtune_api.export import OpenVINOExportOptions
    from amxtune_trainer import export

    def broken_convert(*args, **kwargs):
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(export, "convert", broken_convert)
    output = tmp_path / "new" / "openvino"
    with pytest.raises(RuntimeError, match="conversion failed"):
        export.export_openvino(str(tiny_model), output, OpenVINOExportOptions(height=64, width=64),
                               learned_embeds=learned_embeds)
    assert list(tmp_path.iterdir()) == []


# --- bad input: one line on stderr, exit code 2, nothing written ------------------------------


def _expect_user_error(argv, capsys, message, output):
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err
    assert errors[0].startswith("amxtune-train ") and message in errors[0], err
    assert not output.exists()


def test_export_rejects_a_folder_that_is_not_a_pipeline(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    output = tmp_path / "out"
    _expect_user_error(["export-openvino", "--model", str(tmp_path / "images"), "-o", str(output)],
                       capsys, "is not a diffusers pipeline", output)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--height", "500"], "--height: must be a multiple of 8 (got 500)"),
        (["--width", "32"], "--width: Input should be greater than or equal to 64"),
        (["--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1"),
    ],
)
def test_export_rejects_bad_shapes(tiny_model, tmp_path, capsys, flags, message):
    output = tmp_path / "out"
    _expect_user_error(["export-openvino", "--model", str(tiny_model), "-o", str(output), *flags],
                       capsys, message, output)


def test_export_rejects_an_embedding_for_another_model(tiny_model, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    embeds = tmp_path / "learned_embeds.safetensors"
    save_file({"<big>": torch.zeros(1, 768)}, str(embeds))
    output = tmp_path / "out" / "openvino"
    _expect_user_error(["export-openvino", "--model", str(tiny_model), "--learned-embeds",
                        str(embeds), "-o", str(output), "--height", "64", "--width", "64"],
                       capsys, "has dimension 768", output.parent)


def test_export_refuses_to_replace_without_overwrite(tiny_model, ov_fp32, capsys):
    argv = ["export-openvino", "--model", str(tiny_model), "-o", str(ov_fp32)]
    assert main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "--prompts: Field required"),
        (["--prompt", " "], "--prompts: String should have at least 1 character"),
        (["--prompt", "a", "--prompt", "b", "--prompt", "c"],
         "number of prompts (3) must be a multiple of the batch size (2)"),
        (["--prompt", "a", "--prompt", "b", "--height", "72"],
         "--height 72 does not match the exported static shape (height 64)"),
        (["--prompt", "a", "--prompt", "b", "--height", "70"], "--height: must be a multiple of 8"),
        (["--prompt", "a", "--prompt", "b", "--guidance-scale", "1"],
         "--guidance-scale: Input should be greater than 1"),
        (["--prompt", "a", "--prompt", "b", "--concept-dir", "/nonexistent"],
         "--concept-dir /nonexistent: no images there"),
        (["--prompt", "a", "--prompt", "b", "--baseline-token", "a"],
         "--baseline-token and --baseline-text go together"),
    ],
)
def test_generate_rejects_bad_input(ov_fp32, tmp_path, capsys, flags, message):
    output = tmp_path / "samples"
    _expect_user_error(["generate", "--model", str(ov_fp32), "-o", str(output), *flags],
                       capsys, message, output)


def test_generate_rejects_a_folder_that_is_not_an_export(tiny_model, tmp_path, capsys):
    output = tmp_path / "samples"
    _expect_user_error(["generate", "--model", str(tiny_model), "-o", str(output),
                        "--prompt", "a"], capsys, "is not an OpenVINO pipeline folder", output)
