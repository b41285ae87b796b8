"""Session fixtures: a learned embedding and a full pipeline made against the tiny model, and
two exports of them (fp32 with batch 2, int8 from the full pipeline), made once per run."""

from pathlib import Path

import pytest

TOKEN = "<cat-toy>"
SIZE = 64  # tiny model: 64 px images are 8x8 latents


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from amxtune_trainer.builtin.models import ensure_builtin_model

    return ensure_builtin_model("tiny")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openvino")


@pytest.fixture(scope="session")
def learned_embeds(tiny_model, workdir) -> Path:
    """A two-vector embedding in diffusers' learned_embeds format, as the trainer writes it."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig

    dim = CLIPTextConfig.from_pretrained(tiny_model / "text_encoder").hidden_size
    generator = torch.Generator().manual_seed(5)
    path = workdir / "trainer-output" / "learned_embeds.safetensors"
    path.parent.mkdir(parents=True)
    save_file({TOKEN: torch.randn(2, dim, generator=generator)}, str(path))
    return path


@pytest.fixture(scope="session")
def full_pipeline(tiny_model, learned_embeds) -> Path:
    """OUTPUT/pipeline as the trainer saves it: the tiny pipeline with the token added."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    pipe.load_textual_inversion(str(learned_embeds))
    folder = learned_embeds.parent / "pipeline"
    pipe.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def ov_fp32(tiny_model, learned_embeds, workdir) -> Path:
    """Base model + learned embeddings -> static fp32 export, 2 prompts per call."""
    from amxtune_api.export import OpenVINOExportOptions
    from amxtune_trainer.export import export_openvino

    output = workdir / "fp32" / "openvino"
    options = OpenVINOExportOptions(batch_size=2, height=SIZE, width=SIZE)
    export_openvino(str(tiny_model), output, options, learned_embeds=learned_embeds)
    return output


@pytest.fixture(scope="session")
def ov_int8(full_pipeline, workdir) -> Path:
    """Full pipeline folder -> static int8-weight export, through the command line."""
    from amxtune_trainer.cli import main

    output = workdir / "int8" / "openvino"
    argv = ["export-openvino", "--model", str(full_pipeline), "--output", str(output),
            "--height", str(SIZE), "--width", str(SIZE), "--weight-format", "int8"]
    assert main(argv) == 0
    return output
