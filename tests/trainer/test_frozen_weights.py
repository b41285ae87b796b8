"""One copy of the frozen networks per node (frozen.py): what the ranks map is the model they
would have loaded, the file is gone once mapped, and a store that cannot be written falls back
to private copies."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from trainer_helpers import BASE_ARGS, events, run_trainer, trainer_env

from amxtune_trainer import frozen, models
from amxtune_trainer.errors import UserError

pytestmark = pytest.mark.trainer


def _mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


def _unet_out(components, hidden):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return components.unet(x, torch.tensor([10, 500]), hidden.expand(2, -1, -1)).sample


def test_mapped_networks_are_the_loaded_ones_and_leave_no_file(tmp_path, tiny_model,
                                                              monkeypatch):
    monkeypatch.setenv(frozen.DIR_ENV, str(tmp_path))
    private = models.load_components(tiny_model, unet_channels_last=True)
    shared = models.load_components(tiny_model, unet_channels_last=True, share=True)
    assert [f.parent for f in shared.shared_files] == [tmp_path / "amxtune-frozen"] * 3
    maps = _mapped_files()
    assert all(str(f) in maps for f in shared.shared_files)  # mapped, not read into memory
    for part in ("text_encoder", "vae", "unet"):
        ours, theirs = getattr(private, part).state_dict(), getattr(shared, part).state_dict()
        assert ours.keys() == theirs.keys()
        for name, tensor in ours.items():
            assert torch.equal(tensor, theirs[name]), f"{part}.{name}"
            assert tensor.stride() == theirs[name].stride(), f"{part}.{name}"  # channels_last
        assert not any(p.requires_grad for p in getattr(shared, part).parameters())
        assert not getattr(shared, part).training

    frozen.release(shared.shared_files)
    assert not list((tmp_path / "amxtune-frozen").glob("*.pt"))
    ids = private.tokenizer(["a photo of a toy"], padding="max_length", return_tensors="pt",
                            max_length=private.tokenizer.model_max_length).input_ids
    with torch.no_grad():  # still usable once unlinked: the mappings keep the data
        hidden = private.text_encoder(ids)[0]
        assert torch.equal(hidden, shared.text_encoder(ids)[0])
    # The same weights at other addresses: MKL's sums round differently (max 1.1e-6 measured
    # on an AMD EPYC, 2026-12-01), so equal within float noise rather than bit for bit.
    torch.testing.assert_close(_unet_out(shared, hidden), _unet_out(private, hidden),
                               rtol=1e-4, atol=1e-5)


def test_a_store_that_cannot_be_written_falls_back_to_private_copies(
        tmp_path, tiny_model, monkeypatch):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv(frozen.DIR_ENV, str(not_a_folder))
    components = models.load_components(tiny_model, share=True)
    assert components.shared_files == []
    assert components.unet is not None
    [notice] = components.notices  # one notice, not one per network
    assert "frozen weights are not shared" in notice and frozen.DIR_ENV in notice


def test_a_full_disk_keeps_the_copy_loaded_to_write_it(tmp_path, tiny_model, monkeypatch):
    from transformers import CLIPTextModel

    monkeypatch.setenv(frozen.DIR_ENV, str(tmp_path))
    loads = []
    load = CLIPTextModel.from_pretrained.__func__
    monkeypatch.setattr(CLIPTextModel, "from_pretrained", classmethod(
        lambda cls, *args, **kwargs: loads.append(1) or load(cls, *args, **kwargs)))

    def full_disk(tensors, out):
        out.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    components = models.load_components(tiny_model, unet_channels_last=True, share=True)
    assert components.shared_files == []
    assert len(loads) == 1  # the text encoder loaded to be written is kept, not loaded again
    assert components.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    [notice] = components.notices
    assert "No space left on device" in notice
    assert not list((tmp_path / "amxtune-frozen").glob("*.p*"))  # no .pt, no .partial


def test_a_broken_model_is_reported_as_the_model_not_the_store(tmp_path, tiny_model,
                                                              monkeypatch):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    monkeypatch.setenv(frozen.DIR_ENV, str(tmp_path / "store"))
    with pytest.raises(UserError, match="cannot load the unet of model"):
        models.load_components(broken, share=True)
    # the text encoder's and VAE's files were written before the UNet failed: gone too
    assert not list((tmp_path / "store" / "amxtune-frozen").glob("*.pt"))


def test_two_local_ranks_share_one_copy(tmp_path, tiny_model, concept_dir):
    store = tmp_path / "store"
    store.mkdir()

    def train(out: Path, **env: str) -> dict:
        result = run_trainer([
            *BASE_ARGS, "--train-data-dir", str(concept_dir), "--output-dir", str(out),
            "--max-train-steps", "2", "--seed", "3", "--distributed-backend", "gloo",
        ], ranks=2, env=trainer_env(**{frozen.DIR_ENV: str(store), **env}))
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        [started] = [e for e in events(result.stdout) if e["event"] == "started"]
        metrics["started_notices"] = started["notices"]
        metrics["stderr"] = result.stderr
        return metrics

    metrics = train(tmp_path / "shared")
    # every rank's frozen UNet and text encoder are read from the mapped file, none copied
    mapped = metrics["frozen_weights_mapped_mb_per_rank"]
    unet = models.load_components(tiny_model).unet
    size_mb = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20
    assert len(mapped) == 2 and all(m > size_mb for m in mapped), (mapped, size_mb)
    assert list(store.iterdir()) == []  # the launch's folder is gone with its ranks

    metrics = train(tmp_path / "private", **{frozen.SHARE_ENV: "0"})
    assert metrics["frozen_weights_mapped_mb_per_rank"] == [0, 0]
    assert not any("frozen weights" in n for n in metrics["started_notices"])

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    metrics = train(tmp_path / "unwritable", **{frozen.DIR_ENV: str(not_a_folder)})
    assert metrics["frozen_weights_mapped_mb_per_rank"] == [0, 0]
    # rank 0's notice, once in the log and in the started event (status.trainer)
    [notice] = [n for n in metrics["started_notices"] if "frozen weights" in n]
    assert frozen.DIR_ENV in notice
    assert metrics["stderr"].count("frozen weights are not shared") == 1
