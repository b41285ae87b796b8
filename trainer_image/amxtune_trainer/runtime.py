"""The trainer process: allocator and OpenMP setup, then one rank of a recipe's training.

`run_recipe(args, recipe)` is what `amxtune-train textual-inversion` and `amxtune-train lora`
do: re-exec with a fast allocator preloaded, read the options, probe the CPU, join the other
ranks, then prepare, fit and finish the recipe (a `engine.Trainer` subclass).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path


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


def is_allocator(library: str) -> bool:
    """Whether a preloaded library path is one of the allocators above."""
    return any(name in os.path.basename(library) for name in ALLOCATOR_LIBS)


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


def runs_trainer(command: list[str]) -> bool:
    """Whether a command line (after the interpreter) runs this trainer: `-m amxtune_trainer
    ...` or the `amxtune-train` script."""
    return "amxtune_trainer" in command[:2] or (
        bool(command) and os.path.basename(command[0]) == "amxtune-train")


def preload_allocator(launched: bool | None = None) -> None:
    """Re-exec this process with tcmalloc/jemalloc preloaded, when installed and not yet.

    glibc malloc returns large blocks to the kernel, so every oneDNN weight reorder of the big
    UNet convolutions page-faults a fresh buffer: measured here, a 1280x2560x3x3 bf16 conv
    forward+backward took 0.78 s with glibc and 0.15 s with tcmalloc. Pods get LD_PRELOAD from
    the operator; this makes a plain `python -m amxtune_trainer` (and each torchrun rank, whose
    PID stays the same across exec) equally fast. AMXTUNE_ALLOCATOR=system disables it.
    `launched` says whether this process runs the trainer (default: its own command line).
    """
    choice = os.environ.get("AMXTUNE_ALLOCATOR", "auto")
    preloaded = os.environ.get("LD_PRELOAD", "")
    if choice in ("system", "none", "") or os.environ.get("AMXTUNE_ALLOCATOR_EXEC"):
        return
    if any(map(is_allocator, preloaded.split(":"))) or "torch" in sys.modules:
        return
    if launched is None:
        launched = runs_trainer(sys.orig_argv[1:])
    library = find_allocator(choice)
    if launched and library is not None:
        reexec_with_preload([library, *filter(None, preloaded.split(":"))])


def preloads_without_allocator(preload: str) -> list[str]:
    """LD_PRELOAD's libraries but tcmalloc/jemalloc: others, such as a CPU mask, stay."""
    return [lib for lib in preload.split(":") if lib and not is_allocator(lib)]


def drop_preloaded_allocator() -> None:
    """Re-exec this process without a preloaded allocator: how a user runs a script of theirs."""
    preloaded = os.environ.get("LD_PRELOAD", "")
    if any(map(is_allocator, preloaded.split(":"))) and "torch" not in sys.modules:
        reexec_with_preload(preloads_without_allocator(preloaded))


def reexec_with_preload(libraries: list[str]) -> None:
    """Run this same command line again (same PID) with exactly `libraries` in LD_PRELOAD."""
    env = dict(os.environ, LD_PRELOAD=":".join(libraries), AMXTUNE_ALLOCATOR_EXEC="1")
    if not libraries:
        del env["LD_PRELOAD"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def run_recipe(args: argparse.Namespace, recipe: type) -> int:
    preload_allocator()
    quiet_openmp_waits()
    from amxtune_trainer import options

    config = options.config_from_args(args, recipe.METHOD)
    return train(config, recipe)


def train(config, recipe: type) -> int:
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
        trainer = recipe(config, info, distributed.all_gather_object(info, this_cpu))
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


def pss_mb(pid: int | str = "self") -> float | None:
    """A process's proportional set size now: its private pages plus its share of pages
    mapped by several processes (the shared frozen weights count 1/P in each of P ranks)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def seed_for(*parts: int | str) -> int:
    """A 63-bit seed from its parts (seed, step, micro-batch, rank, ...), stable across runs."""
    digest = hashlib.blake2b(",".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def stop_on_signals(request: Callable[[int], None]):
    """SIGTERM (eviction, drain, suspend) and SIGINT (Ctrl-C) call `request(signum)`, so that
    the trainer ends the current step, every rank stops and rank 0 saves a checkpoint: nothing
    is lost. A second signal stops at once."""
    received: list[int] = []

    def handler(signum, _frame):
        if received:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        received.append(signum)
        request(signum)

    previous = {signum: signal.signal(signum, handler)
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
