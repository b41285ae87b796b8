"""LoRA weights, as the trainer writes them, fused into the base model and exported: the
OpenVINO pipeline renders what PyTorch renders with the adapters, and adapters made for
another base model are refused in one line with nothing written."""

from pathlib import Path

import numpy as np
import pytest
from test_export_generate import MEAN_ABS_TOLERANCE, SIZE, _latents, _shape

from amxtune_api.export import GenerationOptions

pytestmark = pytest.mark.openvino
# Fused adapters are rounded differently by OpenVINO's and PyTorch's fp32 kernels, more than the
# plain weights (measured on an AMX Xeon with unseeded adapters: max 3e-5 to 1.3e-4, mean 3e-6
# to 1.2e-5, against adapter effects of max 0.40 to 0.56, mean 0.050 to 0.062), so the bound is
# relative to what the adapters change: the export reproduces their effect to 0.1 %.
RELATIVE_TOLERANCE = 1e-3


def _lora_file(model_path: Path, folder: Path) -> Path:
    """Rank-4 adapters with random (non-zero) weights on the UNet's attention projections,
    written by the trainer's own writer."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from amxtune_trainer.outputs import LORA_FILE, write_lora

    unet = UNet2DConditionModel.from_pretrained(str(model_path), subfolder="unet")
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                        target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    torch.manual_seed(3)  # peft draws lora_A from the global generator
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapters an effect
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return write_lora(folder / LORA_FILE, {"unet": layers},
                      {"unet": unet.peft_config["default"].to_dict()})


@pytest.fixture(scope="module")
def lora_weights(tiny_model, workdir) -> Path:
    return _lora_file(tiny_model, workdir / "lora-output")


@pytest.fixture(scope="module")
def ov_lora(tiny_model, lora_weights, workdir) -> Path:
    from amxtune_trainer.cli import main

    output = workdir / "lora" / "openvino"
    assert main(["export-openvino", "--model", str(tiny_model), "--lora-weights",
                 str(lora_weights.parent), "-o", str(output), "--height", str(SIZE),
                 "--width", str(SIZE), "--batch-size", "2",
                 "--cache", str(workdir / "lora-cache")]) == 0
    return output


def test_the_fused_export_renders_what_pytorch_renders_with_the_adapters(ov_lora, tiny_model,
                                                                         lora_weights):
    from amxtune_trainer.export import load_openvino_pipeline, read_export_metadata
    from amxtune_trainer.generate import load_pytorch_pipeline, render
    from amxtune_trainer.outputs import fuse_lora

    metadata = read_export_metadata(ov_lora)
    assert metadata["lora_weights"] == str(lora_weights)
    # adapters change the UNet: exported in full, the cache neither read nor written
    assert metadata["cache"] is None and not (ov_lora.parent.parent / "lora-cache").exists()
    options = GenerationOptions(prompts=["a photo of sks toy", "a photo"],
                                num_inference_steps=5)
    latents = _latents(2)

    def images(pipe, backend):
        return np.stack(render(pipe, options, _shape(2), backend=backend, latents=latents,
                               output_type="np").images)

    ov = images(load_openvino_pipeline(ov_lora, precision="fp32"), "openvino")
    plain = load_pytorch_pipeline(str(tiny_model), None)
    without = images(plain, "pytorch")
    fuse_lora(plain, lora_weights)
    with_adapters = images(plain, "pytorch")
    difference = np.abs(ov - with_adapters)
    effect = np.abs(with_adapters - without)
    print(f"OpenVINO vs PyTorch, fused LoRA: max {difference.max():.2e}, "
          f"mean {difference.mean():.2e}; the adapters' effect: max {effect.max():.2e}, "
          f"mean {effect.mean():.2e}")
    assert effect.mean() > 1000 * MEAN_ABS_TOLERANCE  # the adapters do change the images
    assert difference.max() < RELATIVE_TOLERANCE * effect.max()
    assert difference.mean() < RELATIVE_TOLERANCE * effect.mean()


def test_adapters_of_another_base_model_are_refused_and_nothing_is_written(tmp_path, capsys):
    from amxtune_trainer.builtin.models import ensure_builtin_model
    from amxtune_trainer.cli import main

    toyworld_lora = _lora_file(ensure_builtin_model("toyworld"), tmp_path / "toyworld-lora")
    output = tmp_path / "out" / "openvino"
    code = main(["export-openvino", "--model", "tiny", "--lora-weights", str(toyworld_lora),
                 "-o", str(output), "--height", "64", "--width", "64"])
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot fuse" in line and "size mismatch" in line, line
    assert not output.exists()


def test_a_file_without_lora_weights_is_refused(tmp_path, learned_embeds, capsys):
    from amxtune_trainer.cli import main

    output = tmp_path / "out"
    assert main(["export-openvino", "--model", "tiny", "--lora-weights", str(learned_embeds),
                 "-o", str(output)]) == 2
    assert "holds no LoRA weights" in capsys.readouterr().err
    assert not output.exists()
