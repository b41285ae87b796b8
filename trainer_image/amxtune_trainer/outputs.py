"""What rank 0 leaves in the output folder: embeddings, metrics, loss curve, pipeline, images.

Every file is written atomically (temporary file + rename) so that a reader (the export job, a
user, a resumed worker) never sees half a file.
"""

from __future__ import annotations

import json
from pathlib import Path

from amxtune_trainer.checkpoints import atomic_write, atomic_write_text

EMBEDS_FILE = "learned_embeds.safetensors"
A1111_FILE = "learned_embeds.pt"
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


def save_full_pipeline(model_path: Path, folder: Path, embeds_file: Path, placeholder: str):
    """The base pipeline in fp32 with the learned token added (tokenizer and text encoder)."""
    import shutil
    import tempfile

    from amxtune_trainer.builtin.models import save_slow_tokenizer_files
    from amxtune_trainer.models import load_pipeline

    pipeline = load_pipeline(str(model_path))
    pipeline.load_textual_inversion(str(embeds_file), token=placeholder)
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
