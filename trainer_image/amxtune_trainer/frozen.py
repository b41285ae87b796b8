"""One copy of the frozen networks' weights per node, shared by every local rank.

Each rank used to load its own UNet, VAE and text encoder (4.2 GB for SD 1.5 in fp32), so a pod
of P ranks held P copies of weights that nobody changes. Here the first local rank loads each
network once, as `load_components` gives it (UNet and VAE in the training dtype, the UNet in
its memory layout, the text encoder in fp32), and writes its tensors to a node-local file;
every rank then builds the network on the meta device and memory-maps that file
(`torch.load(mmap=True)`). The mapped pages are the page cache's: every process that maps the
file shares them, and the pod's memory cgroup counts them once. Nothing writes to frozen weights
(recipes wrap them: the spliced token table, LoRA adapters; `accelerator: ipex` does replace
them with private copies), so the copy-on-write mappings stay shared. Once every rank has
mapped the files (the all-gather after loading), they are unlinked: the mappings keep them
alive. `amxtune-train launch` gives its ranks a folder of their own and removes it when they
exit, so a rank killed mid-write leaves nothing either.

What stays private per rank: activations, the trainable parameters, and, with bf16, the text
encoder's bf16 copy (it is loaded in fp32 so the new token rows start from the fp32 table) and
the packed convolution weights (fastconv.py; oneDNN's blocked layouts cannot be mapped).

One local rank loads the normal way, as before (nothing to share). `AMXTUNE_SHARE_FROZEN_WEIGHTS=0`
turns sharing off (the memory benchmark compares both); a file that cannot be written (a full
/tmp) leaves each rank its own copy, and rank 0's notice reaches the log and status.trainer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FORMAT = 1  # bump when what a file holds changes
SHARE_ENV = "AMXTUNE_SHARE_FROZEN_WEIGHTS"
DIR_ENV = "AMXTUNE_FROZEN_WEIGHTS_DIR"  # default: $TMPDIR or /tmp (a pod's /tmp emptyDir)
STORE_NAME = "amxtune-frozen"  # the folder in it (mapped_bytes finds the files by it)


def wanted(local_world_size: int) -> bool:
    return local_world_size > 1 and os.environ.get(SHARE_ENV, "1").strip() != "0"


def store_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or tempfile.gettempdir()) / STORE_NAME


def file_key(path: Path, part: str, variant: tuple) -> str:
    """Names what a file holds: the model folder's files (name, size, mtime), how the network
    was loaded (`variant`: dtype, layout), and the library versions that build it."""
    import diffusers
    import torch
    import transformers

    digest = hashlib.sha256(repr((
        FORMAT, str(path.resolve()), part, *map(str, variant),
        torch.__version__, diffusers.__version__, transformers.__version__,
    )).encode())
    for file in sorted((path / part).rglob("*")):
        if file.is_file():
            stat = file.stat()
            digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                          .encode())
    return f"{part}-{digest.hexdigest()[:24]}"


class StoreUnavailable(Exception):
    """The node's folder cannot hold or map the files: keep a private copy instead
    (`module`: the one already loaded to write the file, if any)."""

    def __init__(self, cause: BaseException, module: Any = None):
        super().__init__(cause)
        self.module = module


@contextlib.contextmanager
def _locked(directory: Path, name: str) -> Iterator[None]:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / f"{name}.lock", "a+b")  # noqa: SIM115 (held across the yield)
    except OSError as error:
        raise StoreUnavailable(error) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _tensors(module) -> dict:
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))  # non-persistent ones too
    return {name: tensor.detach() for name, tensor in tensors.items()}


def _write(file: Path, module) -> None:
    import torch

    partial = file.with_name(f"{file.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as out:  # a file object: a full disk is an OSError (ENOSPC)
            torch.save(_tensors(module), out)
        os.replace(partial, file)
    finally:
        partial.unlink(missing_ok=True)


def _assign(module, tensors: dict) -> None:
    """Put the mapped tensors in place of the meta ones (parameters stay frozen)."""
    import torch

    expected = _tensors(module)
    for name, tensor in tensors.items():
        if name not in expected or expected[name].shape != tensor.shape:
            raise RuntimeError(f"the shared weights file does not fit the network at {name}")
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = tensor
        else:
            raise RuntimeError(f"{name} is neither a parameter nor a buffer of the network")
    missing = [name for name, tensor in _tensors(module).items() if tensor.is_meta]
    if missing:
        raise RuntimeError(f"the shared weights file lacks {', '.join(missing[:3])}")


def load(part: str, path: Path, variant: tuple, load_private: Callable[[], Any],
         build_empty: Callable[[], Any]):
    """`part` of the model at `path`, its tensors mapped from this node's shared file (written
    from `load_private()`, the network as training uses it, by whichever rank comes first).
    Returns (module, file)."""
    import torch

    directory = store_dir()
    name = file_key(path, part, variant)
    file = directory / f"{name}.pt"
    with _locked(directory, name):
        if not file.is_file():
            module = load_private()  # its errors are the model's, not the store's
            try:
                _write(file, module)
            except (OSError, RuntimeError) as error:  # the model loaded: the store failed
                raise StoreUnavailable(error, module) from None
            del module
        try:
            tensors = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except OSError as error:
            raise StoreUnavailable(error) from None
    with torch.device("meta"):  # no memory: every tensor comes from the file
        module = build_empty()
    _assign(module, tensors)
    module.requires_grad_(False)
    module.eval()
    return module, file


def release(files: list[Path]) -> None:
    """Unlink this node's files once every local rank has mapped them (after a barrier; any
    rank may, the others find them gone): the mappings keep the data until the ranks exit."""
    for file in files:
        with _locked(file.parent, file.stem):
            file.unlink(missing_ok=True)


def mapped_bytes(modules) -> int:
    """Bytes of the modules' tensors that live in a mapping of a store file (what this rank
    shares), read from /proc/self/maps: 0 when they were copied after all."""
    ranges = []
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and f"/{STORE_NAME}/" in fields[5]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    except OSError:
        return 0
    total = 0
    for module in modules:
        for tensor in _tensors(module).values():
            address = tensor.data_ptr()
            if any(start <= address < end for start, end in ranges):
                total += tensor.numel() * tensor.element_size()
    return total


def fallback_notice(error: StoreUnavailable) -> str:
    cause = error.args[0] if error.args else error
    reason = getattr(cause, "strerror", None) or cause
    return (f"frozen weights are not shared between this node's ranks ({reason}: "
            f"{store_dir()}); each rank holds its own copy. Set {DIR_ENV} to a folder with room "
            "for one copy of the model")
