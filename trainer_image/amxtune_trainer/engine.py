"""The method-free training loop; a recipe (recipes/) subclasses `Trainer` and says what is
trainable, which prompts it trains on and what it writes.

How a step is made cheap (see docs/performance.md):
- only the recipe's parameters require grad; the frozen networks are in eval mode with
  requires_grad off, so the backward computes input gradients (and the adapters' own) only;
- the VAE runs once per image at start (latents.py);
- bf16 where the CPU computes it natively (mixedPrecision auto; cpu.py decides every fast path
  from what the CPU can do): frozen weights stored in bfloat16 (oneDNN uses AMX) under CPU
  autocast, trainable parameters in fp32; channels_last for the UNet; PyTorch SDPA attention;
  the UNet's convolution weights packed once for oneDNN (fastconv.py);
- ranks all-reduce only the trainable gradients (and the loss) once per optimizer step.

A recipe implements the hooks below `# recipe hooks`; everything else is shared. The parts and
what each may import: docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

from amxtune_api.events import TrainingStopped
from amxtune_trainer.errors import Stopped, UserError
from amxtune_trainer.runtime import seed_for, stop_on_signals

# Test hook: raise after this step's checkpoint to simulate a killed worker.
CRASH_ENV = "AMXTUNE_TEST_CRASH_AFTER_STEP"


class Trainer:
    """One rank's training state. `prepare()` validates inputs and builds everything.

    `cpus`: every rank's CpuInfo (probed here when not given, for one rank).
    """

    METHOD = ""  # the trainer subcommand, e.g. "textual-inversion"

    def __init__(self, config, info, cpus: list | None = None):
        from amxtune_trainer import cpu

        self.config = config
        self.info = info
        self.cpus = cpus if cpus is not None else [cpu.probe()] * info.world_size
        self.opt = config.training
        self.rt = config.runtime
        self.output_dir = Path(config.output_dir).expanduser()
        self.allreduce = None
        self.history: list[dict] = []
        self.eval_points: list[dict] = []
        self.step_seconds: list[float] = []
        self.start_step = 0
        self.step = 0
        self.stop_signal: int | None = None  # SIGTERM/SIGINT received: stop after this step
        self.stopping = False  # some rank received one: every rank stops after this step
        self._prompt_ids: dict[str, object] = {}

    # ------------------------------------------------------------------ recipe hooks
    def check_concept(self, concept) -> None:
        """Rank 0, before anything is written: UserError when the images do not suit."""

    def check_model(self, components) -> object:
        """Every rank, before anything is written: check the options against the loaded
        model (UserError); returns what `attach` needs."""
        raise NotImplementedError

    def attach(self, checked: object, state: dict | None) -> list:
        """Add the trainable parts (their values from `state` when resuming); returns the
        parameters to optimize."""
        raise NotImplementedError

    def train_prompts(self, indices: list[int], rng: random.Random) -> list[str]:
        raise NotImplementedError

    def eval_prompts(self, indices: list[int]) -> list[str]:
        raise NotImplementedError

    def method_state(self) -> dict:  # what a checkpoint keeps besides the shared state
        raise NotImplementedError

    def check_resume(self, state: dict, resume: Path | None) -> None:
        """UserError when the checkpoint was made for other method options."""

    def write_weights(self, folder: Path) -> None:  # user-facing weight files, in a checkpoint
        raise NotImplementedError

    def periodic_outputs(self, step: int) -> None:
        """Every save_steps (but the last step): the weights so far, beside the final ones."""

    def final_outputs(self) -> dict:  # rank 0; returns the completed event's method fields
        raise NotImplementedError

    def concept_rows(self) -> dict:
        """name -> (prompt, context manager setting the trained state) for the concept
        similarity rows: "learned" and "before", optionally "initializer"."""
        raise NotImplementedError

    def set_training(self, on: bool) -> None:
        """Modules that behave differently while training (LoRA's dropout): on only inside
        train_step, so the evaluation loss and the rendered images see none of it."""

    def method_metrics(self) -> dict:
        return {}

    # ------------------------------------------------------------------ validation and setup
    def _validate(self):
        """Check data (rank 0), model and method options (every rank) before anything is
        written; every rank learns the first error."""
        from amxtune_trainer import data as data_mod
        from amxtune_trainer import models
        from amxtune_trainer.checkpoints import find_resume_checkpoint
        from amxtune_trainer.distributed import all_gather_object

        error = None
        concept = components = resume = checked = None
        try:
            if self.rt.accelerator == "ipex":
                try:
                    import intel_extension_for_pytorch  # noqa: F401
                except Exception as exc:
                    reason = (str(exc).splitlines() or [type(exc).__name__])[0]
                    raise UserError(
                        f"accelerator 'ipex' asked for but intel_extension_for_pytorch cannot "
                        f"be imported ({reason}); use accelerator 'none'"
                    ) from None
            if self.info.is_main:
                concept = data_mod.load_concept(
                    self.config.train_data_dir, self.opt.resolution, self.opt.center_crop,
                    self.opt.image_extensions, self.opt.use_captions,
                )
                self.check_concept(concept)
                resume = find_resume_checkpoint(self.opt.resume_from_checkpoint, self.output_dir)
            path = models.resolve_model_path(
                self.config.pretrained_model_name_or_path, self.config.revision
            )
            import torch

            from amxtune_trainer import frozen

            components = models.load_components(
                path, torch.bfloat16 if self.plan.bf16 else torch.float32,
                unet_channels_last=self.plan.channels_last,
                share=frozen.wanted(self.info.local_world_size),
            )
            checked = self.check_model(components)
        except UserError as exc:
            error = str(exc)
        errors = [e for e in all_gather_object(self.info, error) if e]
        if components is not None:
            from amxtune_trainer import frozen

            frozen.release(components.shared_files)  # every rank has mapped them by now
            self.plan.notices += components.notices  # announced with the CPU plan's
        if errors:
            raise UserError(errors[0], every_rank=True)
        return concept, components, resume, checked

    def _plan(self) -> None:
        """Choose precision and fast paths from every rank's CPU."""
        from amxtune_trainer import cpu, fastconv

        self.plan = cpu.plan(
            self.cpus, self.info.rank, self.opt.mixed_precision, self.rt.channels_last,
            self.rt.torch_compile, self.rt.accelerator,
            compiler=cpu.cpp_compiler() if self.rt.torch_compile else None,
            pack_fp32=fastconv.fp32_wanted(),
        )
        self.plan.attention, notice = cpu.attention_backend(self.plan.bf16)
        if notice:
            self.plan.notices.append(notice)

    def prepare(self) -> None:
        import torch

        from amxtune_trainer import distributed, report
        from amxtune_trainer.checkpoints import load_state
        from amxtune_trainer.latents import LatentCache

        self._plan()
        concept, comps, resume, checked = self._validate()
        report.announce(self)
        if self.info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.components = comps
        self.model_path = comps.path
        self.tokenizer = comps.tokenizer
        self.noise_scheduler = comps.noise_scheduler
        self.bf16 = self.plan.bf16
        self.weight_dtype = torch.bfloat16 if self.bf16 else torch.float32

        # Frozen networks: eval, no grad; UNet and VAE were loaded in the compute dtype and
        # layout (_validate), the text encoder in fp32 for the new rows' initial values.
        self.unet = comps.unet
        self.text_encoder = comps.text_encoder.to(dtype=self.weight_dtype)
        self.vae = comps.vae if self.info.is_main else None
        if not self.info.is_main:
            comps.vae = None
        if self.rt.accelerator == "ipex":
            import intel_extension_for_pytorch as ipex

            self.unet = ipex.optimize(self.unet, dtype=self.weight_dtype, inplace=True)
            self.text_encoder = ipex.optimize(
                self.text_encoder, dtype=self.weight_dtype, inplace=True
            )
        self.packed_convolutions = 0
        if self.plan.packed_convolutions:
            from amxtune_trainer import fastconv

            self.packed_convolutions = fastconv.pack_frozen_convolutions(self.unet)

        # Resume state (rank 0 reads it, everyone receives it).
        state = load_state(resume) if (self.info.is_main and resume is not None) else None
        state = distributed.broadcast_object(self.info, state)
        if state is not None:
            self.check_resume(state, resume)
        seed = self.opt.seed
        if seed is None:
            seed = random.SystemRandom().randrange(1 << 31)
        self.seed = int(distributed.broadcast_object(
            self.info, state["seed"] if state is not None else seed
        ))
        torch.manual_seed(seed_for(self.seed, self.info.rank))
        self.parameters = self.attach(checked, state)
        for parameter in self.parameters:  # rank 0's initial values (random inits differ)
            distributed.broadcast_tensor(self.info, parameter.data)
        self.unet_forward = torch.compile(self.unet) if self.plan.torch_compile else self.unet

        self.latents = LatentCache(self.info, self.opt, self.noise_scheduler)
        self.latents.seed = self.seed
        self.latents.encode(concept, self.vae, self.weight_dtype, self._autocast)
        self.concept = concept  # rank 0's images, for the concept similarity at the end

        world = self.info.world_size
        lr = self.opt.learning_rate
        if self.opt.scale_lr:
            lr *= self.opt.gradient_accumulation_steps * self.opt.train_batch_size * world
        self.lr = lr
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=lr, betas=(self.opt.adam_beta1, self.opt.adam_beta2),
            weight_decay=self.opt.adam_weight_decay, eps=self.opt.adam_epsilon,
        )
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            self.opt.lr_scheduler, optimizer=self.optimizer,
            num_warmup_steps=self.opt.lr_warmup_steps,
            num_training_steps=self.opt.max_train_steps, num_cycles=self.opt.lr_num_cycles,
        )
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            self.start_step = int(state["step"])
            self.history = list(state.get("history", []))
            self.eval_points = list(state.get("eval_points", []))
            if state.get("torch_rng") is not None:
                torch.set_rng_state(state["torch_rng"][min(self.info.rank,
                                                           len(state["torch_rng"]) - 1)])
            if self.info.is_main:
                print(f"resuming from {resume} at step {self.start_step}", file=sys.stderr)
        self.step = self.start_step
        self.allreduce = distributed.GradientSync(self.info)
        self.samples_per_step = (
            self.opt.train_batch_size * self.opt.gradient_accumulation_steps * world
        )

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        import torch

        if self.bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _ids(self, prompts: list[str]):
        import torch

        missing = [p for p in prompts if p not in self._prompt_ids]
        if missing:
            tokens = self.tokenizer(
                missing, padding="max_length", truncation=True,
                max_length=self.tokenizer.model_max_length, return_tensors="pt",
            ).input_ids
            for prompt, ids in zip(missing, tokens, strict=True):
                self._prompt_ids[prompt] = ids
        return torch.stack([self._prompt_ids[p] for p in prompts])

    def make_batch(self, step: int, micro: int) -> dict:
        draw, prompts = self.latents.draw(step, micro, self.train_prompts)
        return {"latents": draw.latents, "noise": draw.noise, "timesteps": draw.timesteps,
                "ids": self._ids(prompts)}

    def loss(self, batch: dict):
        import torch
        import torch.nn.functional as F

        latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        noisy = noisy.to(self.weight_dtype)
        if self.plan.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            hidden = self.text_encoder(batch["ids"])[0].to(self.weight_dtype)
            pred = self.unet_forward(noisy, timesteps, hidden, return_dict=False)[0]
        return F.mse_loss(pred.float(), target.float(), reduction="mean")

    def train_step(self, step: int) -> float:
        """One optimizer step (with accumulation); returns the loss averaged over ranks."""
        import torch

        accum = self.opt.gradient_accumulation_steps
        self.optimizer.zero_grad(set_to_none=False)
        local = 0.0
        self.set_training(True)
        try:
            for micro in range(accum):
                # draws inside the networks (dropout) are keyed like the batch's, so a
                # resumed run repeats them exactly
                torch.manual_seed(seed_for(self.seed, "networks", step, micro, self.info.rank))
                loss = self.loss(self.make_batch(step, micro))
                (loss / accum).backward()
                local += float(loss.detach()) / accum
        finally:
            self.set_training(False)
        grads = []
        for parameter in self.parameters:
            if parameter.grad is None:  # the graph never reached it (zero gradient)
                parameter.grad = torch.zeros_like(parameter)
            grads.append(parameter.grad)
        mean_loss, self.stopping = self.allreduce(grads, local, stop=self.stop_signal is not None)
        self.optimizer.step()
        self.lr_scheduler.step()
        return mean_loss

    def eval_loss(self) -> float | None:
        """Loss on the fixed evaluation set (same for every run, seed, rank count)."""
        import torch

        count = self.opt.eval_samples
        if count == 0:
            return None
        draw = self.latents.eval_set(count)
        ids = self._ids(self.eval_prompts(draw.indices))
        total = 0.0
        with torch.no_grad():
            for start in range(0, count, 4):
                part = slice(start, start + 4)
                batch = {"latents": draw.latents[part], "noise": draw.noise[part],
                         "timesteps": draw.timesteps[part], "ids": ids[part]}
                total += float(self.loss(batch)) * draw.latents[part].shape[0]
        return total / count

    # ------------------------------------------------------------------ loop and checkpoints
    def fit(self) -> None:
        from amxtune_trainer.progress import Progress

        main = self.info.is_main
        if main and self.start_step == 0 and not self.eval_points:
            value = self.eval_loss()
            if value is not None:
                self.eval_points.append({"step": 0, "loss": value})
        progress = Progress(main, self.opt.max_train_steps, self.start_step,
                            self.samples_per_step, self.opt.logging_steps)
        crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
        try:
            with stop_on_signals(self._request_stop):
                self._loop(progress, crash_after)
        finally:
            progress.close()
        if main and (not self.eval_points or self.eval_points[-1]["step"] != self.step):
            value = self.eval_loss()
            if value is not None:
                self.eval_points.append({"step": self.step, "loss": value})

    def _request_stop(self, signum: int) -> None:
        self.stop_signal = signum

    def _loop(self, progress, crash_after: int) -> None:
        from amxtune_trainer.progress import emit

        main = self.info.is_main
        for step in range(self.start_step + 1, self.opt.max_train_steps + 1):
            began = time.perf_counter()
            loss = self.train_step(step)
            if not math.isfinite(loss):
                raise RuntimeError(f"loss became {loss} at step {step}")
            self.step_seconds.append(time.perf_counter() - began)
            lr = float(self.lr_scheduler.get_last_lr()[0])
            self.step = step
            self.history.append({"step": step, "loss": loss, "lr": lr})
            progress.step(step, loss, lr)
            if main:
                self._periodic(step)
            if crash_after and step == crash_after:
                raise RuntimeError(f"simulated crash after step {step} ({CRASH_ENV})")
            if self.stopping and step < self.opt.max_train_steps:
                if main:
                    saved = step % self.opt.checkpointing_steps == 0  # just now, periodically
                    checkpoint = self._checkpoint_path(step) if saved else self._save(step)
                    emit(TrainingStopped(step=step, checkpoint=str(checkpoint)))
                raise Stopped(self.stop_signal or signal.SIGTERM, step)

    def _periodic(self, step: int) -> None:
        from amxtune_trainer import samples

        if step % self.opt.save_steps == 0 and step != self.opt.max_train_steps:
            self.periodic_outputs(step)
        if step % self.opt.checkpointing_steps == 0:
            value = self.eval_loss()  # the evaluation-set loss at every checkpoint (loss.png)
            if value is not None:
                self.eval_points.append({"step": step, "loss": value})
            self._save(step)
        if self.opt.validation_prompt and step % self.opt.validation_steps == 0:
            samples.validation_images(self, step)

    def _checkpoint_path(self, step: int) -> Path:
        from amxtune_trainer.checkpoints import CHECKPOINTS

        return self.output_dir / CHECKPOINTS / f"checkpoint-{step}"

    def _save(self, step: int) -> Path:
        from amxtune_trainer.checkpoints import save_checkpoint

        return save_checkpoint(self.output_dir, step, self.state_dict(), self.write_weights,
                               self.opt.checkpoints_total_limit)

    def state_dict(self) -> dict:
        import torch

        return {
            "method": self.METHOD,
            "step": self.step,
            "seed": self.seed,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "torch_rng": [torch.get_rng_state()],
            "history": list(self.history),
            "eval_points": list(self.eval_points),
            **self.method_state(),
        }

    def finish(self, started: float) -> None:
        from amxtune_trainer import report

        report.finish(self, started)
