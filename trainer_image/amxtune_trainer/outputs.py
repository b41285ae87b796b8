"""What rank 0 leaves in the output folder: learned weights (embeddings or LoRA adapters, in the
formats diffusers, Automatic1111 and ComfyUI load), metrics, loss curve, pipeline, images.

Every file is written atomically (temporary file + rename) so that a reader (the export job, a
user, a resumed worker) never sees half a file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from amxtune_api.training import EMBEDDINGS_FILE, LORA_FILE
from amxtune_trainer.checkpoints import atomic_write, atomic_write_text

EMBEDS_FILE = EMBEDDINGS_FILE
A1111_FILE = "learned_embeds.pt"
# Automatic1111 / ComfyUI single-file embedding (they name the trigger word after the file)
EMBEDDING_SINGLE_FILE = "learned_embeds_a1111.safetensors"
LORA_KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"  # Automatic1111, ComfyUI
METRICS_FILE = "metrics.json"
LOSS_PLOT = "loss.png"
PIPELINE_DIR = "pipeline"
VALIDATION_DIR = "validation"
CONCEPT_SAMPLES = "concept_samples.png"  # before / initializer / learned, one row each


def write_embeds(path: Path, placeholder: str, vectors) -> Path:
    """`{placeholder: [num_vectors, hidden]}` fp32, what diffusers' load_textual_inversion reads."""
    from safetensors.torch import save_file

    tensor = vectors.detach().float().cpu().contiguous().clone()
    return atomic_write(
        path, lambda tmp: save_file({placeholder: tensor}, str(tmp), metadata={"format": "pt"})
    )


def write_a1111(path: Path, placeholder: str, vectors, step: int) -> Path:
    """Automatic1111's embedding format (the file name is the trigger word there)."""
    import torch

    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vectors.detach().float().cpu().clone()},
        "name": placeholder,
        "step": step,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }
    return atomic_write(path, lambda tmp: torch.save(data, str(tmp)))


def write_embedding_single_file(path: Path, placeholder: str, vectors, step: int) -> Path:
    """`{"emb_params": [num_vectors, hidden]}`, the layout Automatic1111 and ComfyUI read."""
    from safetensors.torch import save_file

    tensor = vectors.detach().float().cpu().contiguous().clone()
    metadata = {"name": placeholder, "step": str(step)}
    return atomic_write(
        path, lambda tmp: save_file({"emb_params": tensor}, str(tmp), metadata=metadata)
    )


def write_lora(path: Path, layers: dict, metadata: dict) -> Path:
    """Adapter weights as diffusers' LoRA scripts save them (`unet.…`, `text_encoder.…` keys,
    each adapter's LoraConfig in the file's metadata, so that alpha loads too)."""
    import tempfile

    from diffusers import StableDiffusionPipeline

    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=tmp.parent) as folder:
            StableDiffusionPipeline.save_lora_weights(
                folder, unet_lora_layers=layers.get("unet"),
                text_encoder_lora_layers=layers.get("text_encoder"),
                unet_lora_adapter_metadata=metadata.get("unet"),
                text_encoder_lora_adapter_metadata=metadata.get("text_encoder"),
                weight_name=LORA_FILE, safe_serialization=True,
            )
            Path(folder, LORA_FILE).replace(tmp)

    return atomic_write(path, write)


def write_lora_kohya(path: Path, peft_layers: dict, alpha: float) -> Path:
    """The same adapters with kohya's key names (`lora_unet_…`, `lora_te1_…`; diffusers' own
    converter, from each network's peft state dict) and our alpha: the converter writes
    alpha = rank, which is only right when alpha was left at its default."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    peft = {f"{network}.{key}": value.detach().float().contiguous()
            for network, layers in peft_layers.items() for key, value in layers.items()}
    kohya = convert_state_dict_to_kohya(peft)
    for key in kohya:
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(float(alpha))
    return atomic_write(path, lambda tmp: save_file(kohya, str(tmp)))


def fuse_lora(pipeline, weights: Path) -> None:
    """Merge the adapters into the pipeline's weights (for a plain pipeline or an export)."""
    pipeline.load_lora_weights(str(weights.parent), weight_name=weights.name,
                               adapter_name="amxtune")
    pipeline.fuse_lora(adapter_names=["amxtune"])
    pipeline.unload_lora_weights()
    # transformers 5 keeps the adapter's key renaming on the text encoder after unloading, so
    # save_pretrained would write `text_base_model.model.model.*` keys that nothing loads: a
    # fresh model of the same config takes the fused weights instead.
    encoder = pipeline.text_encoder
    if getattr(encoder, "_weight_conversions", None):
        clean = type(encoder)(encoder.config)
        clean.load_state_dict(encoder.state_dict())
        pipeline.text_encoder = clean.to(dtype=encoder.dtype).eval()


def write_metrics(path: Path, metrics: dict) -> Path:
    return atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def write_loss_plot(path: Path, history: list[dict], eval_points: list[dict]) -> Path | None:
    """Loss per step (and its running mean) and, in a panel of its own scale, the
    evaluation-set loss with its change since the first point (matplotlib Agg): the training
    loss jumps with every random timestep, so on its scale a steady few-percent fall of the
    evaluation loss would look flat."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
        for i in range(len(losses))
    ]
    figure = Figure(figsize=(10 if eval_points else 7, 4), dpi=100)
    axes = figure.add_subplot(1, 2 if eval_points else 1, 1)
    axes.plot(steps, losses, color="#9ecae1", linewidth=0.8, label="training loss")
    axes.plot(steps, smooth, color="#08519c", linewidth=1.6, label=f"mean of {window}")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (MSE)")
    axes.grid(alpha=0.3)
    axes.legend()
    if eval_points:
        values = [p["loss"] for p in eval_points]
        panel = figure.add_subplot(1, 2, 2)
        panel.plot([p["step"] for p in eval_points], values, "o-", color="#d94801")
        change = 100 * (values[-1] / values[0] - 1) if values[0] else 0.0
        panel.set_title(f"evaluation set: {values[0]:.4f} -> {values[-1]:.4f} ({change:+.1f} %)",
                        fontsize=10)
        panel.set_xlabel("step")
        panel.set_ylabel("loss (MSE), fixed images, noise and timesteps")
        panel.grid(alpha=0.3)
    figure.tight_layout()
    return atomic_write(path, lambda tmp: figure.savefig(str(tmp), format="png"))


def write_png(path: Path, image) -> Path:
    return atomic_write(path, lambda tmp: image.save(str(tmp), format="PNG"))


def save_full_pipeline(model_path: Path, folder: Path, change: Callable[[object], None]):
    """The base pipeline in fp32, changed by the recipe (a token added, adapters fused)."""
    import shutil
    import tempfile

    from amxtune_trainer.builtin.models import save_slow_tokenizer_files
    from amxtune_trainer.models import load_pipeline

    pipeline = load_pipeline(str(model_path))
    change(pipeline)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        pipeline.save_pretrained(str(staging), safe_serialization=True)
        save_slow_tokenizer_files(pipeline.tokenizer, staging / "tokenizer")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
