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


_EARLIER_PEAK_MB = 0.0  # the peak before the last reset_peak_rss()


def _status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited
    from the parent across fork+exec), over its whole life."""
    peak = _status_mb("VmHWM")
    if peak is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return max(_EARLIER_PEAK_MB, peak)


def reset_peak_rss() -> bool:
    """Start measuring the peak from now (VmHWM := VmRSS) so that one phase's own peak can be
    read; peak_rss_mb() still answers for the whole life. False where the kernel refuses."""
    global _EARLIER_PEAK_MB
    before = peak_rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    _EARLIER_PEAK_MB = before
    return True


def phase_peak_rss_mb() -> float | None:
    """The peak since reset_peak_rss()."""
    return _status_mb("VmHWM")


def rss_mb() -> float | None:
    """This process's resident memory now."""
    return _status_mb("VmRSS")


_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a huge number


def _memory_cgroup(proc: Path, cgroup_root: Path) -> tuple[Path, Path, tuple[str, str, str]] | None:
    """(this process's memory cgroup folder, its hierarchy's root, (limit, usage, inactive page
    cache key)) for cgroup v2 or v1."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (cgroup_root / "cgroup.controllers").is_file():
            files = ("memory.max", "memory.current", "inactive_file")
            return cgroup_root / path.lstrip("/"), cgroup_root, files
        if "memory" in controllers.split(","):
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            root = cgroup_root / "memory"
            return root / path.lstrip("/"), root, files
    return None


def free_memory_mb(proc: Path = Path("/proc"),
                   cgroup_root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """Memory this process may still take: the least headroom of its memory cgroup and every
    ancestor with a limit (a container's, its pod's), and the machine's MemAvailable.
    Reclaimable page cache (inactive files) does not count as used."""
    free: list[float] = []
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free.append(int(line.split()[1]) / 1024)
    except (OSError, ValueError, IndexError):
        pass
    found = _memory_cgroup(proc, cgroup_root)
    if found is not None:
        group, root, (limit_file, usage_file, inactive) = found
        for folder in (group, *group.parents):
            try:
                limit = (folder / limit_file).read_text().strip()
                if limit != "max" and int(limit) < _NO_LIMIT:
                    used = int((folder / usage_file).read_text())
                    stat = dict(line.split() for line in
                                (folder / "memory.stat").read_text().splitlines())
                    free.append((int(limit) - used + int(stat.get(inactive, 0))) / 2**20)
            except (OSError, ValueError):
                pass
            if folder == root:
                break
    return min(free) if free else None


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
