"""A cache of base-model exports: a textual inversion's export reuses the base model's.

A textual inversion changes one thing in a Stable Diffusion pipeline: rows of the text
encoder's token table (and the tokenizer's vocabulary). Converting the whole pipeline again for
every job (about 85 s for an SD-1.5-sized pipeline on 2 cores, docs/performance.md) is wasted
work. So the base model is
exported once per (content, export options, library versions) into a cache entry, and each job
copies that export with its token(s) spliced into the text encoder: optimum-intel's
`load_textual_inversion` for OpenVINO pipelines appends the vectors to the embedding constant,
and `text_encoder_in_format` folds that into one table and stores it in the export's weight
format exactly as a fresh export stores its text encoder, so the result renders the same pixels
as a fresh export of base + embeddings.

Layout of an entry, CACHE/<key>/:
  openvino/              the base export, static, as `export-openvino` writes it
  text_encoder.fp32/     the text encoder before weight compression (fp16 / int8 only): new
                         rows must be compressed with the table, as a fresh export does
  entry.json             what the key was made of and how long the export took
CACHE/.file-digests.json remembers each base file's sha256 by size and mtime.
The key is a sha256 of the cache format, the export options, the versions of the converting
libraries and every file of the base pipeline folder (path and sha256 of its content), so a
changed model, option or library makes a new entry. (A file rewritten with the same size and
mtime, as `cp -p` can, is taken from the memo: remove .file-digests.json after such a copy.)
Entries are written into a temporary folder and renamed into place: a job that loses a race to
write the same entry discards its own copy; an interrupted one leaves no entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from amxtune_api.export import OpenVINOExportOptions, WeightFormat

CACHE_FORMAT = "amxtune-openvino-cache/v1"
ENTRY_FILE = "entry.json"
DIGESTS_FILE = ".file-digests.json"  # see source_digest
PLAIN_TEXT_ENCODER = "text_encoder.fp32"
TEXT_ENCODER_IR = "text_encoder/openvino_model.xml"


@dataclass
class CacheEntry:
    folder: Path
    key: str
    hit: bool  # found (True) or exported now (False)

    @property
    def export(self) -> Path:
        return self.folder / "openvino"

    def describe(self) -> dict:
        return {"entry": str(self.folder), "key": self.key, "hit": self.hit}


def source_digest(source: Path, known: dict | None = None) -> str:
    """sha256 over every file of a pipeline folder (its path and content). Hidden files and
    folders (download bookkeeping such as .cache/) are left out: they change, the model doesn't.

    `known` maps a file's absolute path to {size, mtime_ns, sha256} from earlier calls; a file
    whose size and mtime match is not read again (hashing SD-1.5's 4 GiB takes ~6 s on 2 cores),
    and `known` is updated with what was read."""
    known = {} if known is None else known
    digest = hashlib.sha256()
    files = sorted(
        path for path in source.rglob("*")
        if path.is_file() and not any(part.startswith(".")
                                      for part in path.relative_to(source).parts)
    )
    for path in files:
        resolved = path.resolve()
        stat = resolved.stat()
        seen = known.get(str(resolved))
        if _is_hub_lfs_blob(resolved):
            content = resolved.name
        elif seen and (seen["size"], seen["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
            content = seen["sha256"]
        else:
            with resolved.open("rb") as stream:
                content = hashlib.file_digest(stream, "sha256").hexdigest()
            known[str(resolved)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                    "sha256": content}
        digest.update(f"{path.relative_to(source).as_posix()}\0{content}\n".encode())
    return digest.hexdigest()


def _is_hub_lfs_blob(path: Path) -> bool:
    """A file of a huggingface_hub cache that is stored in LFS: its blob is named by the sha256
    of its content (other blobs by a 40-digit git hash), so it need not be read. A model
    downloaded into a pod's emptyDir has new mtimes every time, which the memo cannot help."""
    name = path.name
    return (path.parent.name == "blobs" and len(name) == 64
            and all(c in "0123456789abcdef" for c in name))


def cache_key(source: Path, options: OpenVINOExportOptions, versions: dict[str, str],
              known: dict | None = None) -> str:
    header = json.dumps(
        {"format": CACHE_FORMAT, "options": options.to_wire(), "versions": versions},
        sort_keys=True,
    )
    return hashlib.sha256(f"{header}\n{source_digest(source, known)}".encode()).hexdigest()


def _read_digests(cache: Path) -> dict:
    try:
        return json.loads((cache / DIGESTS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_digests(cache: Path, known: dict) -> None:
    """Best effort, atomic: a lost update only means a file is hashed again."""
    try:
        with tempfile.NamedTemporaryFile("w", dir=cache, prefix=".digests-", delete=False) as out:
            json.dump(known, out)
        os.replace(out.name, cache / DIGESTS_FILE)
    except OSError:
        pass


def base_export(cache: Path, source: Path, options: OpenVINOExportOptions) -> CacheEntry:
    """The cache entry of `source` exported with `options`: found, or exported now."""
    from amxtune_trainer.export import export_base, library_versions

    cache.mkdir(parents=True, exist_ok=True)
    known = _read_digests(cache)
    before = dict(known)
    versions = library_versions()
    key = cache_key(source, options, versions, known)
    if known != before:
        _write_digests(cache, known)
    folder = cache / key[:32]
    if (folder / ENTRY_FILE).is_file():
        return CacheEntry(folder, key, hit=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=cache))
    try:
        started = time.perf_counter()
        plain = staging / PLAIN_TEXT_ENCODER if options.weight_format != WeightFormat.fp32 \
            else None
        export_base(str(source), staging / "openvino", options, plain_text_encoder=plain)
        (staging / ENTRY_FILE).write_text(json.dumps({
            "format": CACHE_FORMAT, "key": key, "source": str(source),
            "options": options.to_wire(), "versions": versions,
            "export_seconds": round(time.perf_counter() - started, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=2) + "\n")
        try:
            staging.rename(folder)
        except OSError:  # another job wrote the same entry meanwhile: theirs is as good
            if not (folder / ENTRY_FILE).is_file():
                raise
        return CacheEntry(folder, key, hit=False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_from_entry(entry: CacheEntry, target: Path, options: OpenVINOExportOptions,
                      embeds: Path | None, token: str | None) -> list[str]:
    """Write the cached base export, with the embedding's token(s) added if any, into
    `target`; return the tokens added."""
    import openvino

    from amxtune_trainer.export import (
        EXPORT_METADATA,
        load_openvino_pipeline,
        text_encoder_in_format,
    )
    from amxtune_trainer.export_sources import add_tokens

    if embeds is None:
        shutil.copytree(entry.export, target, copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns(EXPORT_METADATA))
        return []
    pipe = load_openvino_pipeline(entry.export, compile=False)
    if options.weight_format != WeightFormat.fp32:
        pipe.text_encoder.model = openvino.Core().read_model(
            entry.folder / PLAIN_TEXT_ENCODER / "openvino_model.xml")
    tokens = add_tokens(pipe, embeds, token, "the base model")
    text_encoder = text_encoder_in_format(pipe.text_encoder.model, options.weight_format)
    # Everything but the text encoder and the tokenizer is the base export's, file for file:
    # hard links where the cache and the target share a file system (writing 4 GiB again took
    # most of a cached export), copies elsewhere. The two changed parts are written as new
    # files, never through a link.
    shutil.copytree(entry.export, target, copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns("text_encoder", "tokenizer", EXPORT_METADATA))
    (target / "text_encoder").mkdir()
    shutil.copy2(entry.export / "text_encoder" / "config.json", target / "text_encoder")
    openvino.save_model(text_encoder, target / TEXT_ENCODER_IR, compress_to_fp16=False)
    pipe.tokenizer.save_pretrained(str(target / "tokenizer"))
    return tokens


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
