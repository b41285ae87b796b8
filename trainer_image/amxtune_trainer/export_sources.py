"""What an export starts from: the model (a built-in name, a folder or a hub id, resolved to a
local pipeline folder) and the learned weights added to it before conversion: a textual
inversion's token(s), or LoRA adapters fused into the weights."""

from __future__ import annotations

import json
from pathlib import Path

from amxtune_api.training import EMBEDDINGS_FILE, LORA_FILE
from amxtune_trainer.errors import UserError


def resolve_model(name_or_path: str, revision: str | None = None) -> str:
    """An absolute local Stable Diffusion pipeline folder for a built-in name, folder or hub id.

    Uses the trainer's resolver (amxtune_trainer.models.resolve_model_path: built-ins, folders,
    hub downloads, one-line errors) when it is there; the fallback handles built-ins and
    local folders and passes hub ids through. Either way a local folder must be a Stable
    Diffusion pipeline.
    """
    try:
        from amxtune_trainer.models import resolve_model_path
    except ImportError:
        resolve_model_path = _resolve_model_path_fallback
    resolved = resolve_model_path(name_or_path, revision)
    path = Path(resolved)
    if not path.is_dir():
        return str(resolved)  # a hub id (fallback only): optimum-intel resolves it
    check_pipeline_folder(path)
    return str(path.absolute())


def _resolve_model_path_fallback(name_or_path: str, revision: str | None = None) -> Path | str:
    from amxtune_trainer.builtin.models import NAMES, ensure_builtin_model

    if name_or_path in NAMES and not Path(name_or_path).exists():
        return ensure_builtin_model(name_or_path)
    path = Path(name_or_path).expanduser()
    looks_local = (
        path.exists()
        or name_or_path.startswith((".", "/", "~"))
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
    )
    if not looks_local:
        return name_or_path  # a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5
    check_pipeline_folder(path)
    return path


def check_pipeline_folder(path: Path) -> dict:
    """The model_index.json of a Stable Diffusion pipeline folder, or a UserError."""
    if not path.exists():
        raise UserError(f"{path} does not exist")
    index = path / "model_index.json"
    if not path.is_dir() or not index.is_file():
        raise UserError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        config = json.loads(index.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{index} is not valid JSON: {error}") from None
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer") if c not in config]
    if missing:
        raise UserError(
            f"{path} is not a Stable Diffusion pipeline "
            f"(model_index.json lacks {', '.join(missing)})"
        )
    return config


def resolve_embeddings(path_text: str) -> Path:
    """learned_embeds.safetensors itself, or the folder that holds it; checked to load."""
    path = Path(path_text).expanduser().absolute()
    if path.is_dir():
        path = path / EMBEDDINGS_FILE
    if not path.is_file():
        raise UserError(f"learned embeddings {path} not found")
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: expected a .safetensors file of learned embeddings")
    read_embeddings(path)
    return path


def resolve_lora(path_text: str) -> Path:
    """pytorch_lora_weights.safetensors itself, or the folder that holds it; checked to hold
    LoRA weights in diffusers' naming."""
    from safetensors import SafetensorError, safe_open

    path = Path(path_text).expanduser().absolute()
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise UserError(f"LoRA weights {path} not found")
    try:
        with safe_open(str(path), framework="pt") as weights:
            keys = list(weights.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable safetensors file: {error}") from None
    if not any(".lora" in key for key in keys):
        raise UserError(f"{path} holds no LoRA weights")
    return path


def read_embeddings(path: Path) -> dict:
    """{token: tensor[n, dim]} from a diffusers-format learned_embeds.safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable safetensors file: {error}") from None
    if not tensors:
        raise UserError(f"{path} holds no embeddings")
    for token, tensor in tensors.items():
        if tensor.ndim not in (1, 2):
            raise UserError(f"{path}: embedding {token!r} has shape {list(tensor.shape)}, "
                            "expected [vectors, dim]")
    return tensors


def load_fp32(source: str, revision: str | None):
    import torch
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_pretrained(
            source, revision=revision, torch_dtype=torch.float32, safety_checker=None,
            requires_safety_checker=False, local_files_only=Path(source).is_absolute(),
        )
    except OSError as error:
        raise UserError(f"cannot load {source}: {str(error).splitlines()[0]}") from None


def pipeline_with_lora(source: str, weights: Path, revision: str | None, folder: Path) -> str:
    """Save `source` with the LoRA adapters fused into its weights into `folder`."""
    from amxtune_trainer.outputs import fuse_lora

    pipe = load_fp32(source, revision)
    try:
        fuse_lora(pipe, weights)
    except (ValueError, RuntimeError, KeyError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("size mismatch")),
                      lines[0] if lines else type(error).__name__)
        raise UserError(f"cannot fuse {weights} into {source} (trained for another base "
                        f"model?): {detail[:300]}") from None
    pipe.save_pretrained(str(folder))
    write_slow_tokenizer_files(folder / "tokenizer")
    return str(folder.absolute())


def check_embeddings(embeds: Path, token: str | None, source: str) -> None:
    """A UserError unless `embeds` can be added to the base model `source` (a local folder):
    one embedding when `token` renames it, each as wide as the text encoder's token table."""
    tensors = read_embeddings(embeds)
    if token and len(tensors) != 1:
        raise UserError(f"--token needs a file with one embedding; {embeds} has {len(tensors)}")
    config = Path(source) / "text_encoder" / "config.json"
    if not config.is_file():
        return  # a hub id: checked when the text encoder is loaded
    width = json.loads(config.read_text())["hidden_size"]
    for name, tensor in tensors.items():
        if tensor.shape[-1] != width:
            raise UserError(
                f"{embeds}: embedding {name!r} has dimension {tensor.shape[-1]}, but the text "
                f"encoder of {source} uses {width}: trained for another base model?"
            )


def pipeline_with_embeddings(
    source: str, embeds: Path, token: str | None, revision: str | None, folder: Path
) -> tuple[str, list[str]]:
    """Save `source` with the embedding's token(s) added into `folder`; return it and the tokens."""
    check_embeddings(embeds, token, source)
    pipe = load_fp32(source, revision)
    tokens = add_tokens(pipe, embeds, token, source)
    pipe.save_pretrained(str(folder))
    write_slow_tokenizer_files(folder / "tokenizer")
    return str(folder.absolute()), tokens


def add_tokens(pipe, embeds: Path, token: str | None, base: str) -> list[str]:
    """Load the embedding into a pipeline (diffusers', or optimum-intel's OpenVINO one: the same
    call); return the tokens it added to the vocabulary."""
    before = set(pipe.tokenizer.get_vocab())
    try:
        pipe.load_textual_inversion(str(embeds), token=token)
    except ValueError as error:
        raise UserError(f"cannot add {embeds} to {base}: {error}") from None
    return sorted(set(pipe.tokenizer.get_vocab()) - before)


def write_slow_tokenizer_files(folder: Path) -> None:
    """transformers 5 saves only tokenizer.json; older readers also need vocab.json/merges.txt."""
    from transformers import CLIPTokenizer

    from amxtune_trainer.builtin.models import save_slow_tokenizer_files

    if (folder / "vocab.json").is_file():
        return
    save_slow_tokenizer_files(CLIPTokenizer.from_pretrained(str(folder)), folder)
