"""The export cache: a textual inversion is exported from the base model's cached export, with
the same pixels as a fresh export, and the second job on a base model does not convert it."""

import json

import numpy as np
import pytest

from amxtune_api.export import GenerationOptions, OpenVINOExportOptions

pytestmark = pytest.mark.openvino

TOKEN = "<cat-toy>"  # as in conftest.py
SIZE = 64


def _images(folder, prompt: str) -> np.ndarray:
    from amxtune_trainer.export import load_openvino_pipeline
    from amxtune_trainer.generate import render

    options = GenerationOptions(prompts=[prompt], num_inference_steps=4, seed=3)
    shape = {"batch_size": 1, "height": SIZE, "width": SIZE, "num_images_per_prompt": 2}
    return np.stack(render(load_openvino_pipeline(folder), options, shape, backend="openvino",
                           output_type="np").images)


def _second_embedding(folder, tiny_model, token: str):
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig

    dim = CLIPTextConfig.from_pretrained(tiny_model / "text_encoder").hidden_size
    path = folder / "learned_embeds.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({token: torch.randn(1, dim, generator=torch.Generator().manual_seed(9))}, str(path))
    return path


# fp16 is the same path as int8 (the text encoder stored from its uncompressed copy); measured
# max pixel difference to a fresh export: 0.0 for fp32, fp16, int8 and int8-full (the same IR
# values, so the same pixels; int8-full's calibration prompts do not hold the token, so a
# fresh export's UNet is quantized as the cached one): the test allows only float noise.
@pytest.mark.parametrize("weight_format", ["fp32", "int8", "int8-full"])
def test_a_cached_export_renders_the_pixels_of_a_fresh_export(tiny_model, learned_embeds,
                                                              tmp_path, weight_format):
    from amxtune_trainer.export import export_openvino
    from amxtune_trainer.export_cache import DIGESTS_FILE, ENTRY_FILE

    options = OpenVINOExportOptions(height=SIZE, width=SIZE, num_images_per_prompt=2,
                                    weight_format=weight_format)
    cache = tmp_path / "cache"
    fresh = export_openvino(str(tiny_model), tmp_path / "fresh", options,
                            learned_embeds=learned_embeds)
    first = export_openvino(str(tiny_model), tmp_path / "first", options,
                            learned_embeds=learned_embeds, cache=cache)
    other = _second_embedding(tmp_path / "other-job", tiny_model, "<other>")
    second = export_openvino(str(tiny_model), tmp_path / "second", options,
                             learned_embeds=other, cache=cache)
    again = export_openvino(str(tiny_model), tmp_path / "again", options,
                            learned_embeds=learned_embeds, cache=cache)

    assert (first["cache"]["hit"], second["cache"]["hit"], again["cache"]["hit"]) == (
        False, True, True)
    entries = [p for p in cache.iterdir() if p.name != DIGESTS_FILE]
    assert [p.name for p in entries] == [first["cache"]["entry"].rsplit("/", 1)[1]]
    assert json.loads((entries[0] / ENTRY_FILE).read_text())["options"] == options.to_wire()
    assert first["placeholder_tokens"] == fresh["placeholder_tokens"] == again[
        "placeholder_tokens"]
    assert second["placeholder_tokens"] == ["<other>"]
    assert first["weight_bytes"] == fresh["weight_bytes"]
    prompt = f"a photo of {TOKEN} on the beach"
    expected = _images(tmp_path / "fresh", prompt)
    assert np.abs(_images(tmp_path / "first", prompt) - expected).max() <= 1e-6
    assert np.abs(_images(tmp_path / "again", prompt) - expected).max() <= 1e-6
    # the cached base stays the base: no job's token in it, and each job has only its own
    from transformers import CLIPTokenizer

    def vocab(folder):
        return CLIPTokenizer.from_pretrained(str(folder / "tokenizer")).get_vocab()

    assert TOKEN not in vocab(entries[0] / "openvino")
    assert "<other>" not in vocab(entries[0] / "openvino")
    assert "<other>" in vocab(tmp_path / "second") and TOKEN not in vocab(tmp_path / "second")
    # the base alone, from the entry: no token, nothing converted
    plain = export_openvino(str(tiny_model), tmp_path / "plain", options, cache=cache)
    assert plain["cache"]["hit"] and plain["placeholder_tokens"] == []
    assert TOKEN not in vocab(tmp_path / "plain") and "<other>" not in vocab(tmp_path / "plain")
    # the UNet is the entry's file (a hard link here), the text encoder a file of the job's own
    unet, text_encoder = "unet/openvino_model.bin", "text_encoder/openvino_model.bin"
    assert (tmp_path / "second" / unet).samefile(entries[0] / "openvino" / unet)
    assert not (tmp_path / "second" / text_encoder).samefile(
        entries[0] / "openvino" / text_encoder)


def test_an_interrupted_cache_export_leaves_no_entry(tiny_model, learned_embeds, tmp_path,
                                                     monkeypatch):
    from amxtune_trainer import export
    from amxtune_trainer.export import export_openvino

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_base", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_openvino(str(tiny_model), tmp_path / "out" / "openvino",
                        OpenVINOExportOptions(height=SIZE, width=SIZE),
                        learned_embeds=learned_embeds, cache=tmp_path / "cache")
    from amxtune_trainer.export_cache import DIGESTS_FILE

    assert [p.name for p in (tmp_path / "cache").iterdir()] == [DIGESTS_FILE]
    assert not (tmp_path / "out").exists()


def test_inference_jobs_on_one_base_share_its_export(tiny_model, learned_embeds, full_pipeline,
                                                     tmp_path, capsys):
    """The InferenceJob pod's command: the first job stores the base export, the next one
    (a trainer output with a full pipeline/ too) reuses it; the status fields say so."""
    import shutil

    from amxtune_api.events import ExportCompleted
    from amxtune_api.inferencejob import InferenceTask
    from amxtune_trainer.cli import main

    def run_job(folder, prompt):
        task = InferenceTask(prompts=[prompt], num_inference_steps=3,
                             openvino={"height": SIZE, "width": SIZE},
                             source_dir=str(folder), base_model=str(tiny_model),
                             output_dir=str(folder), cache_dir=str(tmp_path / "cache"))
        (folder / "task.json").write_text(json.dumps(task.to_wire()))
        capsys.readouterr()
        assert main(["inference", f"--config={folder / 'task.json'}"]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        return ExportCompleted.model_validate_json(line)

    first_job = tmp_path / "first"
    first_job.mkdir()
    shutil.copy(learned_embeds, first_job)
    shutil.copytree(full_pipeline, first_job / "pipeline")
    second_job = tmp_path / "second"
    _second_embedding(second_job, tiny_model, "<other>")

    first = run_job(first_job, f"a photo of {TOKEN}")
    second = run_job(second_job, "a photo of <other>")
    assert (first.export_cache, second.export_cache) == ("stored", "hit")
    assert first.source == second.source == "embeddings"
    assert second.export_seconds < first.export_seconds
    assert len(second.image_paths) == 1 and (second_job / "samples" / "grid.png").is_file()


def test_quieting_the_libraries_does_not_import_nncf():
    """NNCF takes ~3 s to import; `generate` and fp32/fp16 exports never need it."""
    import subprocess
    import sys

    code = ("import sys; from amxtune_trainer.export import quiet_libraries; quiet_libraries(); "
            "print('nncf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
