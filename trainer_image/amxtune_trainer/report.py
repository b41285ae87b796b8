"""What a run tells: the notices and the started event at the beginning; at the end, every
rank's result checked equal, the recipe's final files, metrics.json, loss.png and the completed
event (rank 0)."""

from __future__ import annotations

import hashlib
import os
import statistics
import sys
import time

from amxtune_api.events import TrainingCompleted, TrainingStarted


def announce(trainer) -> None:
    """Notices on stderr, and rank 0's "started" line (once the inputs are known good)."""
    from amxtune_trainer.progress import emit

    own, first = trainer.cpus[trainer.info.rank], trainer.cpus[0]
    if trainer.info.is_main or own.summary() != first.summary():
        prefix = "" if trainer.info.is_main else f"rank {trainer.info.rank}: "
        for line in trainer.plan.notices:
            print(f"amxtune-train {trainer.METHOD}: notice: {prefix}{line}",
                  file=sys.stderr, flush=True)
    if trainer.info.is_main:
        plan = trainer.plan
        emit(TrainingStarted(
            method=trainer.METHOD, world_size=trainer.info.world_size, cpu=first.summary(),
            cpu_class=first.cpu_class,
            other_cpus=sorted({c.summary() for c in trainer.cpus} - {first.summary()}),
            precision=plan.label, precision_reason=plan.precision_reason,
            packed_convolutions=plan.packed_convolutions, channels_last=plan.channels_last,
            torch_compile=plan.torch_compile, attention=plan.attention, notices=plan.notices,
        ))


def parameters_digest(parameters) -> str:
    """sha256 of the trainable values, to check that every rank ended with the same ones."""
    digest = hashlib.sha256()
    for parameter in parameters:
        digest.update(parameter.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def finish(trainer, started: float) -> None:
    from amxtune_trainer import frozen, outputs, samples
    from amxtune_trainer.distributed import all_gather_object
    from amxtune_trainer.progress import emit
    from amxtune_trainer.runtime import peak_rss_mb, pss_mb

    info, opt = trainer.info, trainer.opt
    gathered = all_gather_object(info, (
        parameters_digest(trainer.parameters), peak_rss_mb(), list(info.cores),
        frozen.mapped_bytes([trainer.unet, trainer.text_encoder]) / 2**20, pss_mb(),
    ))
    if not info.is_main:
        return
    digests = [g[0] for g in gathered]
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different trained weights: {digests}")
    completed_fields = trainer.final_outputs()
    if opt.validation_prompt and trainer.step % opt.validation_steps != 0:
        samples.validation_images(trainer, trainer.step)
    similarity = samples.concept_similarity(trainer) if opt.concept_similarity_images else None
    steady = trainer.step_seconds[1:] or trainer.step_seconds
    median = statistics.median(steady) if steady else None
    wall = time.perf_counter() - started
    final_loss = trainer.history[-1]["loss"] if trainer.history else float("nan")
    plan = trainer.plan
    metrics = {
        "method": trainer.METHOD,
        "steps": trainer.step,
        "max_train_steps": opt.max_train_steps,
        "resumed_from_step": trainer.start_step,
        "final_loss": final_loss,
        "eval_loss": trainer.eval_points,
        "seconds_per_step_median": median,
        "samples_per_step": trainer.samples_per_step,
        "samples_per_second": (trainer.samples_per_step / median) if median else None,
        "wall_seconds": wall,
        "world_size": info.world_size,
        "backend": info.backend,
        "threads_per_rank": info.threads,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "packed_convolutions": trainer.packed_convolutions,
        "cpu": trainer.cpus[0].to_dict(),
        "cpu_per_rank": [c.summary() for c in trainer.cpus],
        "mixed_precision": {"requested": opt.mixed_precision, "used": plan.label,
                            "reason": plan.precision_reason},
        "fast_paths": {key: value for key, value in plan.to_dict().items()
                       if key in ("packed_convolutions", "channels_last", "torch_compile",
                                  "attention")},
        "notices": plan.notices,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "trainable_parameters": sum(p.numel() for p in trainer.parameters),
        "allreduce_bytes_per_step": trainer.allreduce.bytes_per_step,
        "rank_weights_sha256": digests,
        "peak_rss_mb_per_rank": [round(g[1], 1) for g in gathered],
        # at the end of training; the memory benchmark samples the peak
        "pss_mb_per_rank": [None if g[4] is None else round(g[4], 1) for g in gathered],
        # the frozen UNet's and text encoder's bytes mapped from the node's one copy (frozen.py)
        "frozen_weights_mapped_mb_per_rank": [round(g[3], 1) for g in gathered],
        "cores_per_rank": [g[2] for g in gathered],
        "step_seconds": [round(s, 4) for s in trainer.step_seconds],
        "learning_rate": trainer.lr,
        "seed": trainer.seed,
        "concept_similarity": similarity,
        "history": trainer.history,
        "config": trainer.config.to_wire(),
        **trainer.method_metrics(),
    }
    outputs.write_metrics(trainer.output_dir / outputs.METRICS_FILE, metrics)
    outputs.write_loss_plot(trainer.output_dir / outputs.LOSS_PLOT, trainer.history,
                            trainer.eval_points)
    emit(TrainingCompleted(
        method=trainer.METHOD, output_dir=str(trainer.output_dir.resolve()), **completed_fields,
        steps=int(trainer.step), final_loss=float(final_loss), wall_seconds=round(wall, 3),
        concept_similarity=None if similarity is None else {
            k: v for k, v in similarity.items() if k in ("before", "initializer", "learned")},
    ))
