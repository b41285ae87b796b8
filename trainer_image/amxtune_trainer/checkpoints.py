"""Resumable state and atomic file writes.

A checkpoint is a folder `checkpoints/checkpoint-STEP/` with `state.pt` (the trained values,
optimizer, LR scheduler, RNG states, step, seed, loss history) and the step's weights in their
user-facing format (`learned_embeds.safetensors` or `pytorch_lora_weights.safetensors`). It is
written into a temporary folder and renamed, so a crash never leaves a half-written checkpoint
that `latest` would pick; old ones are pruned to the limit.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from amxtune_trainer.errors import UserError

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def atomic_write(path: Path, writer: Callable[[Path], None]) -> Path:
    """Call writer(tmp_path) then rename tmp_path to path (same folder, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def find_resume_checkpoint(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder to resume from; None to start fresh.

    'latest' picks the newest complete checkpoint under OUTPUT/checkpoints (none yet: start
    fresh). A path may be a checkpoint folder or a folder of checkpoints; no checkpoint there is
    an error.
    """
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir / CHECKPOINTS)
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    for candidate in (path, path / CHECKPOINTS):
        found = list_checkpoints(candidate)
        if found:
            return found[-1][1]
    raise UserError(f"resume_from_checkpoint {resume}: no checkpoint found there")


def save_checkpoint(
    output_dir: Path, step: int, state: dict, write_weights: Callable[[Path], None],
    limit: int | None,
) -> Path:
    """Write checkpoint-STEP atomically (temp folder + rename), then prune to `limit`;
    `write_weights(folder)` adds the recipe's weight files."""
    import torch

    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"checkpoint-{step}"
    staging = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=root))
    try:
        torch.save(state, staging / STATE_FILE)
        write_weights(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if limit:
        for _, old in list_checkpoints(root)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_state(checkpoint: Path) -> dict:
    import torch

    try:
        return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as error:
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"cannot read checkpoint {checkpoint}: {first}") from None
