"""Base-model resolution and loading: a hub id, a local diffusers folder, or a built-in name.

`resolve_model_path` turns what the user wrote into a local diffusers folder (building a
built-in model or downloading/looking up the hub cache; `HF_HUB_OFFLINE=1` is honoured by
huggingface_hub); every failure is a one-line UserError, not a stack trace. `load_pipeline` and
`load_components` load from that folder. Other subcommands (export, generate) use these too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amxtune_trainer.errors import UserError

# Sub-folders a Stable Diffusion pipeline needs (hub downloads fetch only these).
PIPELINE_PATTERNS = [
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "text_encoder/*.json",
    "text_encoder/*.safetensors",
    "unet/*.json",
    "unet/*.safetensors",
    "vae/*.json",
    "vae/*.safetensors",
    "feature_extractor/*",
]
# Variants a hub pipeline often carries beside the main weights: not needed, gigabytes each.
IGNORE_PATTERNS = ["*.fp16.*", "*.non_ema.*", "*.ema.*", "*.ckpt", "*.onnx", "*.msgpack"]


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else that is not a folder is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model_path(name_or_path: str, revision: str | None = None) -> Path:
    """Return a local diffusers pipeline folder for a built-in name, a folder or a hub id."""
    from amxtune_trainer.builtin.models import NAMES, ensure_builtin_model

    if name_or_path in NAMES:
        return ensure_builtin_model(name_or_path)
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise UserError(
                f"model folder {local} is not a diffusers pipeline (no model_index.json)"
            )
        return local.resolve()
    if local.exists():
        raise UserError(f"model {name_or_path} is a file; expected a diffusers pipeline folder")
    if _looks_like_path(name_or_path):
        raise UserError(f"model folder {name_or_path} does not exist")
    return _download(name_or_path, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=PIPELINE_PATTERNS,
                              ignore_patterns=IGNORE_PATTERNS)
        )
    except HFValidationError:
        raise UserError(
            f"model {repo_id!r} is neither a built-in model (toyworld, tiny, sd15-arch), an "
            "existing folder, nor a valid hub id"
        ) from None
    except GatedRepoError:
        raise UserError(
            f"model {repo_id} is gated: accept its licence and provide a token (HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"model {repo_id} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise UserError(
            f"model {repo_id} not found on the hub (or private: provide HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE=1 and it is not in the hub cache" if offline else (
            "the hub is unreachable and it is not in the cache"
        )
        raise UserError(f"model {repo_id} cannot be loaded: {where}") from None
    except OSError as error:
        raise UserError(f"model {repo_id} cannot be downloaded: {error}") from None
    except Exception as error:  # HTTP errors and the like: one line, not a traceback
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"model {repo_id} cannot be downloaded: {first}") from None
    if not (folder / "model_index.json").is_file():
        raise UserError(f"model {repo_id} is not a diffusers pipeline (no model_index.json)")
    return folder


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline the trainer uses."""

    path: Path
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    shared_files: list[Path] = field(default_factory=list)  # frozen.py: unlink once all mapped
    notices: list[str] = field(default_factory=list)  # why they are not shared after all


def _load_error(path: Path, part: str, error: Exception) -> UserError:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return UserError(f"cannot load the {part} of model {path}: {first}")


def load_tokenizer(path: Path):
    from transformers import CLIPTokenizer

    try:
        # transformers 5: from_pretrained(folder) is the supported way to load a saved
        # tokenizer (it also reads the folder's tokenizer_config.json).
        return CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
    except Exception as error:
        raise _load_error(path, "tokenizer", error) from None


def load_components(path: Path, image_dtype=None, *, unet_channels_last: bool = False,
                    share: bool = False) -> Components:
    """Load tokenizer, text encoder, VAE, UNet (frozen, eval) and the DDPM scheduler.

    The text encoder is loaded in fp32 (the new vectors start from its rows); the UNet and VAE
    in `image_dtype` (default fp32), which halves the peak memory for bf16 training; the UNet
    in channels_last when asked. `share`: map the three networks from this node's shared files
    (frozen.py) instead of holding a copy of our own; when they cannot be written, the copy is
    our own after all and `notices` says why.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from amxtune_trainer import frozen

    tokenizer = load_tokenizer(path)
    kwargs = {"torch_dtype": image_dtype} if image_dtype is not None else {}
    unet_layout = torch.channels_last if unet_channels_last else torch.contiguous_format
    loaders = {  # part -> (how it is loaded: the shared file's variant, load, build empty)
        "text_encoder": ((None,), lambda: CLIPTextModel.from_pretrained(
            str(path / "text_encoder")), lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(
                str(path / "text_encoder")))),
        "vae": ((image_dtype,), lambda: AutoencoderKL.from_pretrained(
            str(path), subfolder="vae", **kwargs), lambda: AutoencoderKL.from_config(
                AutoencoderKL.load_config(str(path), subfolder="vae"))),
        "unet": ((image_dtype, unet_layout), lambda: UNet2DConditionModel.from_pretrained(
            str(path), subfolder="unet", **kwargs).to(memory_format=unet_layout),
            lambda: UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(str(path), subfolder="unet"))),
    }
    parts: dict[str, Any] = {}
    shared_files: list[Path] = []
    notices: list[str] = []

    def load(part: str):
        nonlocal share
        variant, load_private, build_empty = loaders[part]
        if share:
            try:
                module, file = frozen.load(part, path, variant, load_private, build_empty)
                shared_files.append(file)
                return module
            except frozen.StoreUnavailable as error:
                notices.append(frozen.fallback_notice(error))
                share = False
                if error.module is not None:  # loaded to be written: keep it
                    return error.module
        return load_private()

    try:
        for part in loaders:
            try:
                parts[part] = load(part)
            except Exception as error:
                raise _load_error(path, part.replace("_", " "), error) from None
        try:
            parts["noise_scheduler"] = DDPMScheduler.from_pretrained(str(path),
                                                                     subfolder="scheduler")
        except Exception as error:
            raise _load_error(path, "noise scheduler", error) from None
    except UserError:
        frozen.release(shared_files)  # the job fails: leave nothing on disk
        raise
    for part in loaders:
        parts[part].requires_grad_(False)
        parts[part].eval()
    return Components(path=path, tokenizer=tokenizer, shared_files=shared_files,
                      notices=notices, **parts)


def load_pipeline(model: str | Path, revision: str | None = None, torch_dtype=None):
    """A StableDiffusionPipeline from a built-in name, folder or hub id (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    path = resolve_model_path(str(model), revision)
    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        return StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
    except Exception as error:
        raise _load_error(path, "pipeline", error) from None
