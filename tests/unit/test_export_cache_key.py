"""The export cache's key: the base model's content, the export options and the library
versions, so that no change can make a job reuse a stale export."""

import os

import pytest

from amxtune_api.export import OpenVINOExportOptions
from amxtune_trainer.export_cache import cache_key

pytestmark = pytest.mark.unit

VERSIONS = {"openvino": "2026.4.1", "optimum-intel": "2.2.0"}


@pytest.fixture
def model(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (tmp_path / "model_index.json").write_text("{}")
    return tmp_path


def test_the_key_follows_content_options_and_versions(model):
    options = OpenVINOExportOptions(height=64, width=64)
    key = cache_key(model, options, VERSIONS)
    assert cache_key(model, options, VERSIONS) == key
    assert cache_key(model, options.model_copy(update={"weight_format": "int8"}), VERSIONS) != key
    assert cache_key(model, options.model_copy(update={"batch_size": 2}), VERSIONS) != key
    assert cache_key(model, options, {**VERSIONS, "openvino": "2026.5.0"}) != key
    (model / ".cache").mkdir()  # a hub download's bookkeeping: not the model
    (model / ".cache" / "download.metadata").write_text("etag, time")
    assert cache_key(model, options, VERSIONS) == key
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weightz")
    assert cache_key(model, options, VERSIONS) != key
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (model / "unet" / "diffusion_pytorch_model.safetensors").rename(model / "unet" / "other")
    assert cache_key(model, options, VERSIONS) != key  # a renamed file: another model


def test_a_file_with_the_same_size_and_mtime_is_not_read_again(model):
    from amxtune_trainer.export_cache import source_digest

    known: dict = {}
    first = source_digest(model, known)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    assert known[str(weights.resolve())]["sha256"] == __import__("hashlib").sha256(
        b"weights").hexdigest()
    known[str(weights.resolve())]["sha256"] = "0" * 64  # what a stale memo would say
    assert source_digest(model, known) != first  # the memo was used, the file not read
    weights.write_bytes(b"weights")  # rewritten: a new mtime, so it is read again
    os.utime(weights, ns=(1, 1))
    assert source_digest(model, known) == first


def test_a_hub_cache_file_in_lfs_is_known_by_its_blob_name(model, monkeypatch):
    """huggingface_hub names an LFS blob by its sha256: the digest takes the name, reads
    nothing, and equals the digest of the same files in a plain folder."""
    import hashlib

    from amxtune_trainer import export_cache

    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    plain = export_cache.source_digest(model)
    blobs = model.parent / "hub" / "blobs"
    blobs.mkdir(parents=True)
    blob = blobs / hashlib.sha256(weights.read_bytes()).hexdigest()
    weights.rename(blob)
    weights.symlink_to(blob)
    read = []
    real_file_digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest",
                        lambda stream, name: read.append(stream.name) or real_file_digest(
                            stream, name))
    assert export_cache.source_digest(model) == plain
    assert str(blob) not in read and read  # model_index.json (not in LFS) was read
