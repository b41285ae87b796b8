"""Run programs as on an older CPU: the CPUID mask of tests/support/cpumask/cpumask.c.

The tests must pass on every x86-64 CPU with AVX2, and CI runs on whatever machine it gets:
on a Xeon with AMX the paths for CPUs without AVX-512 would otherwise never run. Loaded with
LD_PRELOAD, the mask hides the instruction sets above a level from CPUID, so PyTorch, oneDNN and
OpenVINO pick the kernels they pick on such a CPU, and run them natively. It follows
subprocesses (LD_PRELOAD is inherited), so torchrun-like launchers are masked too; the masked
test node preloads it in every container through /etc/ld.so.preload (tests/support/node.py).

CPUID can be masked only where the kernel offers CPUID faulting (`cpuid_fault`). Elsewhere (many
VMs, such as an AMD EPYC with AVX-512 but no faulting) the library masks the kernel's view
instead (/proc/cpuinfo), which the trainer's probe requires to agree with CPUID, and the
libraries' own limits hold oneDNN, ATen and MKL to the level (`LIBRARY_LIMITS`, set in both
cases). What is not held there: PyTorch's own CPUID checks and OpenVINO still see the real CPU.

`masked_environment(level)` builds the library once (gcc) into the cache, checks with the
trainer's own probe that the mask took, and returns the variables to add to a process's
environment. On a CPU that is already at or below the level nothing needs masking.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cpumask") / "cpumask.c"
# What each level may still show (the trainer probe's feature names).
ALLOWED = {
    "avx2": {"avx2"},
    "avx512": {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
}


# The ISA limits oneDNN, ATen (PyTorch's vectorised kernels) and MKL read from the environment.
LIBRARY_LIMITS = {
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI", "ATEN_CPU_CAPABILITY": "avx512",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}


def masks_cpuid() -> bool:
    """Whether the mask can change CPUID here (CPUID faulting), or only the kernel's view."""
    try:
        return "cpuid_fault" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


class CpuMaskError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("AMXTUNE_CACHE", Path.home() / ".cache" / "amxtune")) / "cpumask"


@functools.cache
def library() -> Path:
    """The compiled mask, rebuilt when the source changes."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    target = cache_dir() / f"libcpumask-{digest}.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise CpuMaskError("the CPU mask needs a C compiler: install gcc (apt-get install gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(built),
             str(SOURCE)], capture_output=True, text=True)
        if result.returncode != 0:
            raise CpuMaskError(f"building {SOURCE} failed:\n{result.stderr}")
        built.replace(target)
    return target


def environment(level: str) -> dict[str, str]:
    """Variables that mask CPUID down to `level` in a process and its children."""
    if level not in ALLOWED:
        raise ValueError(f"unknown CPU mask level {level!r}; one of {sorted(ALLOWED)}")
    preload = [str(library()), *filter(None, os.environ.get("LD_PRELOAD", "").split(":"))]
    return {"LD_PRELOAD": ":".join(preload), "AMXTUNE_CPUMASK": level, **LIBRARY_LIMITS[level]}


def probe(env: dict[str, str] | None = None) -> dict:
    """The trainer's CPU probe (amxtune-train doctor --json) in a process with `env` added."""
    result = subprocess.run(
        [sys.executable, "-m", "amxtune_trainer", "doctor", "--json"],
        env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise CpuMaskError(f"amxtune-train doctor failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)["cpu"]


@functools.cache
def masked_environment(level: str) -> dict[str, str]:
    """`environment(level)`, checked to really hide everything above `level`."""
    env = environment(level)
    seen = set(probe(env)["features"])
    extra = seen - ALLOWED[level]
    if extra:
        how = "CPUID" if masks_cpuid() else "/proc/cpuinfo (no CPUID faulting here)"
        raise CpuMaskError(
            f"masking this CPU down to {level} did not take: the probe still sees "
            f"{', '.join(sorted(extra))} although {SOURCE.name} masks {how}")
    return env
