"""`amxtune-train textual-inversion`: learn a new token's embedding, on one rank or many.

How a step is made cheap (see docs/performance.md):
- only the new vectors are a parameter (embedding.SplicedEmbedding); frozen networks are in
  eval mode with requires_grad off, so the backward computes input gradients only;
- the VAE runs once per image and flip variant at start; its latent distribution (mean, std)
  is kept and sampled per step as the reference script does after encoding every step;
- bf16 where the CPU computes it natively (mixedPrecision auto; cpu.py decides every fast path
  from what the CPU can do): the frozen UNet/VAE/text encoder weights are stored in bfloat16
  (oneDNN uses AMX) and run under CPU autocast; channels_last for the UNet; PyTorch SDPA
  attention; the UNet's convolution weights are packed once for oneDNN instead of reordered on
  every call (fastconv.py);
- ranks all-reduce only the vectors' gradient (and the loss) once per optimizer step.

Every random draw of a step (images, templates, flips, timesteps, noise) derives from
(seed, step, micro-batch, rank), so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import random
import resource
import signal
import statistics
import sys
import time
from pathlib import Path

from amxtune.api.events import EVENT_COMPLETED, EVENT_STARTED, EVENT_STOPPED
from amxtune_trainer import options
from amxtune_trainer.errors import Stopped, UserError

# Test hook: raise after this step's checkpoint to simulate a killed worker.
CRASH_ENV = "AMXTUNE_TEST_CRASH_AFTER_STEP"
EVAL_SEED = 20240607


def configure_parser(parser: argparse.ArgumentParser) -> None:
    options.configure_parser(parser)


def quiet_openmp_waits() -> None:
    """Let idle OpenMP threads sleep instead of spinning, unless the environment says otherwise.

    Must run before torch is imported. On a shared or oversubscribed node a spinning thread
    steals the core its peer needs: measured here, a UNet step went from 3 s to 16-22 s with
    the default spin-wait when other processes were busy; the UNet's kernels are long enough
    that sleeping costs nothing measurable when the node is idle.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


ALLOCATOR_LIBS = {
    "tcmalloc": ["libtcmalloc_minimal.so.4", "libtcmalloc.so.4"],
    "jemalloc": ["libjemalloc.so.2"],
}
LIB_DIRS = ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
            os.path.join(sys.prefix, "lib")]


def find_allocator(name: str = "auto") -> str | None:
    """Path of tcmalloc (preferred) or jemalloc, if installed."""
    names = list(ALLOCATOR_LIBS) if name == "auto" else [name]
    for lib_name in names:
        for filename in ALLOCATOR_LIBS.get(lib_name, []):
            for folder in LIB_DIRS:
                path = os.path.join(folder, filename)
                if os.path.isfile(path):
                    return path
    return None


def preload_allocator() -> None:
    """Re-exec this process with tcmalloc/jemalloc preloaded, when installed and not yet.

    glibc malloc returns large blocks to the kernel, so every oneDNN weight reorder of the big
    UNet convolutions page-faults a fresh buffer: measured here, a 1280x2560x3x3 bf16 conv
    forward+backward took 0.78 s with glibc and 0.15 s with tcmalloc. Pods get LD_PRELOAD from
    the operator; this makes a plain `python -m amxtune_trainer` (and each torchrun rank, whose
    PID stays the same across exec) equally fast. AMXTUNE_ALLOCATOR=system disables it.
    """
    choice = os.environ.get("AMXTUNE_ALLOCATOR", "auto")
    preloaded = os.environ.get("LD_PRELOAD", "")
    if choice in ("system", "none", "") or os.environ.get("AMXTUNE_ALLOCATOR_EXEC"):
        return
    if "tcmalloc" in preloaded or "jemalloc" in preloaded or "torch" in sys.modules:
        return
    argv = list(getattr(sys, "orig_argv", []))
    launched = len(argv) > 1 and (
        "amxtune_trainer" in argv[1:3] or os.path.basename(argv[1]) == "amxtune-train"
    )
    library = find_allocator(choice)
    if not launched or library is None:
        return
    env = dict(os.environ, LD_PRELOAD=":".join(p for p in (library, preloaded) if p),
               AMXTUNE_ALLOCATOR_EXEC="1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def run(args: argparse.Namespace) -> int:
    preload_allocator()
    quiet_openmp_waits()
    config = options.config_from_args(args)
    return train(config)


def train(config) -> int:
    """Train as one rank of a (possibly one-rank) job; returns the exit code."""
    from amxtune_trainer import cpu, distributed
    from amxtune_trainer.errors import NodeLacksAmx

    start = time.perf_counter()
    info = distributed.detect()
    this_cpu = cpu.probe()
    if config.require_amx and (problem := cpu.amx_missing(this_cpu)):
        raise NodeLacksAmx(problem, every_rank=True)  # before anything loads or connects
    distributed.pin_cores(info)
    distributed.init(info, config.runtime.distributed_backend)
    try:
        trainer = Trainer(config, info, distributed.all_gather_object(info, this_cpu))
        trainer.prepare()
        trainer.fit()
        trainer.finish(start)
    finally:
        distributed.shutdown(info)
    return 0


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited
    from the parent across fork+exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _seed_for(*parts: int) -> int:
    digest = hashlib.blake2b(",".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Trainer:
    """One rank's training state. `prepare()` validates inputs and builds everything.

    `cpus`: every rank's CpuInfo (probed here when not given, for one rank).
    """

    def __init__(self, config, info, cpus: list | None = None):
        from amxtune_trainer import cpu

        self.config = config
        self.info = info
        self.cpus = cpus if cpus is not None else [cpu.probe()] * info.world_size
        self.ti = config.textual_inversion
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
        self._perm_epoch = -1
        self._perm = None

    # ------------------------------------------------------------------ validation and setup
    def _validate(self):
        """Check data (rank 0), model and tokens (every rank) before anything is written."""
        from amxtune_trainer import data as data_mod
        from amxtune_trainer import embedding, models
        from amxtune_trainer.checkpoints import find_resume_checkpoint
        from amxtune_trainer.distributed import all_gather_object

        error = None
        concept = components = resume = None
        new_ids: list[int] = []
        init_vectors = None
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
                resume = find_resume_checkpoint(self.opt.resume_from_checkpoint, self.output_dir)
            path = models.resolve_model_path(
                self.config.pretrained_model_name_or_path, self.config.revision
            )
            import torch

            components = models.load_components(
                path, torch.bfloat16 if self.plan.bf16 else None
            )
            tokenizer = components.tokenizer
            init_ids = None
            if not self.ti.initial_embedding:
                init_ids = embedding.initializer_ids(tokenizer, self.ti.initializer_token)
            new_ids = embedding.add_placeholder_tokens(
                tokenizer, self.ti.placeholder_token, self.ti.num_vectors
            )
            weight = components.text_encoder.get_input_embeddings().weight
            if self.ti.initial_embedding:
                init_vectors = embedding.read_embedding_file(
                    self.ti.initial_embedding, self.ti.num_vectors, weight.shape[1]
                )
            else:
                init_vectors = embedding.initial_vectors(weight, init_ids, self.ti.num_vectors)
        except UserError as exc:
            error = str(exc)
        errors = [e for e in all_gather_object(self.info, error) if e]
        if errors:
            raise UserError(errors[0], every_rank=True)
        return concept, components, resume, new_ids, init_vectors

    def _plan(self) -> None:
        """Choose precision and fast paths from every rank's CPU."""
        from amxtune_trainer import cpu

        self.plan = cpu.plan(
            self.cpus, self.info.rank, self.opt.mixed_precision, self.rt.channels_last,
            self.rt.torch_compile, self.rt.accelerator,
            compiler=cpu.cpp_compiler() if self.rt.torch_compile else None,
        )
        self.plan.attention, notice = cpu.attention_backend(self.plan.bf16)
        if notice:
            self.plan.notices.append(notice)

    def _announce(self) -> None:
        """Notices on stderr, and rank 0's "started" line (once the inputs are known good)."""
        from amxtune_trainer.progress import emit

        own, first = self.cpus[self.info.rank], self.cpus[0]
        if self.info.is_main or own.summary() != first.summary():
            prefix = "" if self.info.is_main else f"rank {self.info.rank}: "
            for line in self.plan.notices:
                print(f"amxtune-train textual-inversion: notice: {prefix}{line}",
                      file=sys.stderr, flush=True)
        if self.info.is_main:
            emit({
                "event": EVENT_STARTED,
                "world_size": self.info.world_size,
                "cpu": first.summary(),
                "cpu_class": first.cpu_class,
                "other_cpus": sorted({c.summary() for c in self.cpus} - {first.summary()}),
                "precision": self.plan.label,
                "precision_reason": self.plan.precision_reason,
                "packed_convolutions": self.plan.packed_convolutions,
                "channels_last": self.plan.channels_last,
                "torch_compile": self.plan.torch_compile,
                "attention": self.plan.attention,
                "notices": self.plan.notices,
            })

    def prepare(self) -> None:
        import torch

        from amxtune_trainer import distributed, embedding
        from amxtune_trainer.checkpoints import load_state

        self._plan()
        concept, comps, resume, new_ids, init_vectors = self._validate()
        self._announce()
        if self.info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.components = comps
        self.model_path = comps.path
        self.tokenizer = comps.tokenizer
        self.noise_scheduler = comps.noise_scheduler
        self.bf16 = self.plan.bf16
        self.weight_dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.token_text = embedding.token_text(self.ti.placeholder_token, self.ti.num_vectors)
        from amxtune_trainer.data import templates_for

        self.templates = templates_for(self.ti.learnable_property)

        # Frozen networks: eval, no grad, weights in the compute dtype, UNet channels_last.
        self.unet = comps.unet.to(dtype=self.weight_dtype)
        if self.plan.channels_last:
            self.unet = self.unet.to(memory_format=torch.channels_last)
        self.text_encoder = comps.text_encoder.to(dtype=self.weight_dtype)
        self.vae = comps.vae.to(dtype=self.weight_dtype) if self.info.is_main else None
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
            from amxtune_trainer.fastconv import pack_frozen_convolutions

            self.packed_convolutions = pack_frozen_convolutions(self.unet)
        self.unet_forward = self.unet
        if self.plan.torch_compile:
            self.unet_forward = torch.compile(self.unet)

        # Resume state (rank 0 reads it, everyone receives it).
        state = load_state(resume) if (self.info.is_main and resume is not None) else None
        state = distributed.broadcast_object(self.info, state)
        if state is not None:
            saved = (state.get("placeholder_token"), state.get("num_vectors"))
            if saved != (self.ti.placeholder_token, self.ti.num_vectors):
                raise UserError(
                    f"checkpoint {resume or 'on rank 0'} learns {saved[0]!r} with {saved[1]} "
                    f"vectors, not {self.ti.placeholder_token!r} with {self.ti.num_vectors}"
                )
            init_vectors = state["vectors"]
            initial = state.get("initial_vectors")
        seed = self.opt.seed
        if seed is None:
            seed = random.SystemRandom().randrange(1 << 31)
        self.seed = int(distributed.broadcast_object(
            self.info, state["seed"] if state is not None else seed
        ))
        torch.manual_seed(_seed_for(self.seed, self.info.rank))

        if state is None:
            initial = init_vectors
        # what the token started from (older checkpoints did not keep it)
        self.initial_vectors = None if initial is None else initial.detach().float().clone()
        self.embedding = embedding.splice(self.text_encoder, new_ids, init_vectors)
        self.vectors = self.embedding.vectors

        self._prepare_latents(concept)
        self.concept = concept  # rank 0's images, for the concept similarity at the end

        world = self.info.world_size
        lr = self.opt.learning_rate
        if self.opt.scale_lr:
            lr *= self.opt.gradient_accumulation_steps * self.opt.train_batch_size * world
        self.lr = lr
        self.optimizer = torch.optim.AdamW(
            [self.vectors], lr=lr, betas=(self.opt.adam_beta1, self.opt.adam_beta2),
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

    def _prepare_latents(self, concept) -> None:
        """Rank 0 encodes each image (and its flip) once; the latent distribution is broadcast."""
        import torch

        from amxtune_trainer import distributed

        header = None
        if self.info.is_main:
            pixels = torch.stack([torch.from_numpy(p) for p in concept.pixels])
            variants = [pixels] + ([torch.flip(pixels, dims=[3])] if self.opt.random_flip else [])
            means, stds = [], []
            with torch.no_grad(), self._autocast():
                for variant in variants:
                    for chunk in variant.split(4):
                        dist = self.vae.encode(chunk.to(self.weight_dtype)).latent_dist
                        means.append(dist.mean.float())
                        stds.append(dist.std.float())
            n = pixels.shape[0]
            self.latent_mean = torch.cat(means).view(len(variants), n, *means[0].shape[1:])
            self.latent_std = torch.cat(stds).view_as(self.latent_mean)
            self.captions = concept.captions
            header = (tuple(self.latent_mean.shape), self.captions)
            self.vae_scale = float(self.vae.config.scaling_factor)
        shape, captions = distributed.broadcast_object(self.info, header)
        if not self.info.is_main:
            self.latent_mean = torch.empty(shape)
            self.latent_std = torch.empty(shape)
            self.captions = captions
        distributed.broadcast_tensor(self.info, self.latent_mean)
        distributed.broadcast_tensor(self.info, self.latent_std)
        self.vae_scale = float(distributed.broadcast_object(
            self.info, getattr(self, "vae_scale", None)
        ))
        self.num_images = shape[1]

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

    def _image_indices(self, step: int, micro: int) -> list[int]:
        """A DistributedSampler-like walk over shuffled epochs of images x repeats."""
        import torch

        batch, world = self.opt.train_batch_size, self.info.world_size
        length = self.num_images * self.opt.repeats
        first = ((step - 1) * self.opt.gradient_accumulation_steps + micro) * batch * world
        first += self.info.rank * batch
        out = []
        for position in range(first, first + batch):
            epoch = position // length
            if epoch != self._perm_epoch:
                generator = torch.Generator().manual_seed(_seed_for(self.seed, "epoch", epoch))
                self._perm = torch.randperm(length, generator=generator)
                self._perm_epoch = epoch
            out.append(int(self._perm[position % length]) % self.num_images)
        return out

    def make_batch(self, step: int, micro: int) -> dict:
        import torch

        from amxtune_trainer.data import make_prompt

        seed = _seed_for(self.seed, step, micro, self.info.rank)
        generator = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        indices = self._image_indices(step, micro)
        batch = len(indices)
        variants = [
            rng.randrange(self.latent_mean.shape[0]) if self.opt.random_flip else 0
            for _ in indices
        ]
        prompts = [make_prompt(i, self.captions, self.templates, self.token_text, rng)
                   for i in indices]
        mean = self.latent_mean[variants, indices]
        std = self.latent_std[variants, indices]
        sample = torch.randn(mean.shape, generator=generator)
        latents = (mean + std * sample) * self.vae_scale
        noise = torch.randn(latents.shape, generator=generator)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (batch,), generator=generator)
        return {"latents": latents, "noise": noise, "timesteps": timesteps,
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
        accum = self.opt.gradient_accumulation_steps
        self.optimizer.zero_grad(set_to_none=False)
        local = 0.0
        for micro in range(accum):
            loss = self.loss(self.make_batch(step, micro))
            (loss / accum).backward()
            local += float(loss.detach()) / accum
        if self.vectors.grad is None:  # cannot happen unless the prompt lost the token
            raise RuntimeError("the placeholder token received no gradient")
        mean_loss, self.stopping = self.allreduce(self.vectors.grad, local,
                                                  stop=self.stop_signal is not None)
        self.optimizer.step()
        self.lr_scheduler.step()
        return mean_loss

    # ------------------------------------------------------------------ evaluation
    def eval_loss(self) -> float | None:
        """Loss on the fixed evaluation set (same for every run, seed, rank count)."""
        import torch

        count = self.opt.eval_samples
        if count == 0:
            return None
        generator = torch.Generator().manual_seed(EVAL_SEED)
        indices = [j % self.num_images for j in range(count)]
        latents = self.latent_mean[0, indices] * self.vae_scale
        noise = torch.randn(latents.shape, generator=generator)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (count,), generator=generator)
        from amxtune_trainer.data import caption_prompt

        prompts = [
            caption_prompt(self.captions[i], self.token_text) if self.captions[i] is not None
            else self.templates[0].format(self.token_text)
            for i in indices
        ]
        ids = self._ids(prompts)
        total = 0.0
        with torch.no_grad():
            for start in range(0, count, 4):
                part = slice(start, start + 4)
                batch = {"latents": latents[part], "noise": noise[part],
                         "timesteps": timesteps[part], "ids": ids[part]}
                total += float(self.loss(batch)) * latents[part].shape[0]
        return total / count

    # ------------------------------------------------------------------ loop and outputs
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
            with self._stop_on_signals():
                self._loop(progress, crash_after)
        finally:
            progress.close()
        if main and (not self.eval_points or self.eval_points[-1]["step"] != self.step):
            value = self.eval_loss()
            if value is not None:
                self.eval_points.append({"step": self.step, "loss": value})

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM (eviction, drain, suspend) and SIGINT (Ctrl-C) end the current step, then
        every rank stops and rank 0 saves a checkpoint, so nothing is lost. A second signal
        stops at once."""
        def request(signum, _frame):
            if self.stop_signal is not None:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            self.stop_signal = signum

        previous = {signum: signal.signal(signum, request)
                    for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

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
                self._periodic_outputs(step)
            if crash_after and step == crash_after:
                raise RuntimeError(f"simulated crash after step {step} ({CRASH_ENV})")
            if self.stopping and step < self.opt.max_train_steps:
                if main:
                    saved = step % self.opt.checkpointing_steps == 0  # just now, periodically
                    checkpoint = self._checkpoint_path(step) if saved else self._save(step)
                    emit({"event": EVENT_STOPPED, "step": step, "checkpoint": str(checkpoint)})
                raise Stopped(self.stop_signal or signal.SIGTERM, step)

    def _periodic_outputs(self, step: int) -> None:
        from amxtune_trainer import outputs

        if step % self.opt.save_steps == 0 and step != self.opt.max_train_steps:
            outputs.write_embeds(
                self.output_dir / f"learned_embeds-steps-{step}.safetensors",
                self.ti.placeholder_token, self.vectors,
            )
        if step % self.opt.checkpointing_steps == 0:
            value = self.eval_loss()  # the evaluation-set loss at every checkpoint (loss.png)
            if value is not None:
                self.eval_points.append({"step": step, "loss": value})
            self._save(step)
        if self.opt.validation_prompt and step % self.opt.validation_steps == 0:
            self.validate(step)

    def _checkpoint_path(self, step: int) -> Path:
        from amxtune_trainer.checkpoints import CHECKPOINTS

        return self.output_dir / CHECKPOINTS / f"checkpoint-{step}"

    def _save(self, step: int) -> Path:
        from amxtune_trainer import outputs
        from amxtune_trainer.checkpoints import save_checkpoint

        return save_checkpoint(
            self.output_dir, step, self.state_dict(),
            lambda path: outputs.write_embeds(path, self.ti.placeholder_token, self.vectors),
            self.opt.checkpoints_total_limit,
        )

    def state_dict(self) -> dict:
        import torch

        return {
            "step": self.step,
            "seed": self.seed,
            "vectors": self.vectors.detach().clone(),
            "initial_vectors": self.initial_vectors,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "torch_rng": [torch.get_rng_state()],
            "history": list(self.history),
            "eval_points": list(self.eval_points),
            "placeholder_token": self.ti.placeholder_token,
            "num_vectors": self.ti.num_vectors,
        }

    def _render(self, prompt: str, count: int, seed: int) -> list:
        """`count` images of `prompt` with the current embedding (rank 0; the placeholder
        token stands for all its vectors)."""
        import torch
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        pipeline = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            unet=self.unet, scheduler=DPMSolverMultistepScheduler.from_config(
                self.noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(seed)
        if self.ti.num_vectors > 1:
            prompt = prompt.replace(self.ti.placeholder_token, self.token_text)
        images = []
        with torch.no_grad(), self._autocast():
            for _ in range(count):
                result = pipeline(
                    prompt, num_inference_steps=self.opt.validation_inference_steps,
                    generator=generator, height=self.opt.resolution, width=self.opt.resolution,
                )
                images.append(result.images[0])
        return images

    def concept_similarity(self) -> dict:
        """How much 'a photo of a TOKEN' looks like the training images with the initial and
        with the learned embedding, and 'a photo of a INITIALIZER' (same seeds for all three);
        writes the three rows side by side into concept_samples.png."""
        import numpy as np
        from PIL import Image

        from amxtune_trainer import outputs
        from amxtune_trainer.images import make_grid
        from amxtune_trainer.toyworld.similarity import concept_similarity

        count, prompt = self.opt.concept_similarity_images, "a photo of a {}"
        references = [Image.fromarray(((p.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255)
                                      .astype(np.uint8)) for p in self.concept.pixels]
        rendered = {"learned": self._render(prompt.format(self.ti.placeholder_token), count,
                                            self.seed)}
        if self.initial_vectors is not None:
            learned = self.vectors.detach().clone()
            self.vectors.data.copy_(self.initial_vectors)
            rendered["before"] = self._render(prompt.format(self.ti.placeholder_token), count,
                                              self.seed)
            self.vectors.data.copy_(learned)
        if self.ti.initializer_token and not self.ti.initial_embedding:
            rendered["initializer"] = self._render(prompt.format(self.ti.initializer_token),
                                                   count, self.seed)
        result: dict = {"prompt": prompt, "images_per_prompt": count}
        for name, images in rendered.items():
            result[name] = round(concept_similarity(images, references), 4)
        order = [name for name in ("before", "initializer", "learned") if name in rendered]
        result["rows_of_concept_samples_png"] = order
        grid = make_grid([image for name in order for image in rendered[name]], columns=count)
        outputs.write_png(self.output_dir / outputs.CONCEPT_SAMPLES, grid)
        return result

    def validate(self, step: int) -> list[Path]:
        """Render the validation prompt with the current embedding (rank 0)."""
        from amxtune_trainer import outputs
        from amxtune_trainer.images import make_grid

        images = self._render(self.opt.validation_prompt, self.opt.num_validation_images,
                              self.seed)
        folder = self.output_dir / outputs.VALIDATION_DIR / f"step-{step}"
        paths = [outputs.write_png(folder / f"image-{i}.png", im) for i, im in enumerate(images)]
        paths.append(outputs.write_png(folder / "grid.png", make_grid(images)))
        return paths

    def finish(self, started: float) -> None:
        """Final outputs (rank 0) and the completed event; checks every rank agrees."""
        from amxtune_trainer import outputs
        from amxtune_trainer.distributed import all_gather_object
        from amxtune_trainer.progress import emit

        digest = hashlib.sha256(
            self.vectors.detach().float().contiguous().numpy().tobytes()
        ).hexdigest()
        rss_mb = peak_rss_mb()
        gathered = all_gather_object(self.info, (digest, rss_mb, list(self.info.cores)))
        if not self.info.is_main:
            return
        digests = [g[0] for g in gathered]
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks ended with different embeddings: {digests}")
        placeholder = self.ti.placeholder_token
        embeds = outputs.write_embeds(
            self.output_dir / outputs.EMBEDS_FILE, placeholder, self.vectors
        )
        if self.opt.save_a1111:
            outputs.write_a1111(self.output_dir / outputs.A1111_FILE, placeholder,
                                self.vectors, self.step)
        if self.opt.validation_prompt and self.step % self.opt.validation_steps != 0:
            self.validate(self.step)
        if self.opt.save_as_full_pipeline:
            outputs.save_full_pipeline(
                self.model_path, self.output_dir / outputs.PIPELINE_DIR, embeds, placeholder
            )
        similarity = self.concept_similarity() if self.opt.concept_similarity_images else None
        steady = self.step_seconds[1:] or self.step_seconds
        median = statistics.median(steady) if steady else None
        wall = time.perf_counter() - started
        final_loss = self.history[-1]["loss"] if self.history else float("nan")
        metrics = {
            "steps": self.step,
            "max_train_steps": self.opt.max_train_steps,
            "resumed_from_step": self.start_step,
            "final_loss": final_loss,
            "eval_loss": self.eval_points,
            "seconds_per_step_median": median,
            "samples_per_second": (self.samples_per_step / median) if median else None,
            "wall_seconds": wall,
            "world_size": self.info.world_size,
            "backend": self.info.backend,
            "threads_per_rank": self.info.threads,
            "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "packed_convolutions": self.packed_convolutions,
            "cpu": self.cpus[0].to_dict(),
            "cpu_per_rank": [c.summary() for c in self.cpus],
            "mixed_precision": {"requested": self.opt.mixed_precision,
                                "used": self.plan.label,
                                "reason": self.plan.precision_reason},
            "fast_paths": {key: value for key, value in self.plan.to_dict().items()
                           if key in ("packed_convolutions", "channels_last", "torch_compile",
                                      "attention")},
            "notices": self.plan.notices,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "allreduce_bytes_per_step": self.allreduce.bytes_per_step,
            "rank_embedding_sha256": digests,
            "peak_rss_mb_per_rank": [round(g[1], 1) for g in gathered],
            "cores_per_rank": [g[2] for g in gathered],
            "step_seconds": [round(s, 4) for s in self.step_seconds],
            "learning_rate": self.lr,
            "seed": self.seed,
            "placeholder_tokens": self.token_text.split(),
            "concept_similarity": similarity,
            "history": self.history,
            "config": self.config.to_wire(),
        }
        outputs.write_metrics(self.output_dir / outputs.METRICS_FILE, metrics)
        outputs.write_loss_plot(self.output_dir / outputs.LOSS_PLOT, self.history,
                                self.eval_points)
        completed = {
            "event": EVENT_COMPLETED,
            "output_dir": str(self.output_dir.resolve()),
            "learned_embeds": str(embeds.resolve()),
            "steps": int(self.step),
            "final_loss": float(final_loss),
            "wall_seconds": round(wall, 3),
        }
        if similarity is not None:
            completed["concept_similarity"] = {
                k: v for k, v in similarity.items() if k in ("before", "initializer", "learned")}
        emit(completed)
