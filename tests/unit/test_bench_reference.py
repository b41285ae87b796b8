"""The reference script runs as a user runs it: our allocator preload is dropped, a CPU mask
preload stays (else a masked benchmark would time the reference on the unmasked CPU)."""

import os

import pytest

from amxtune_trainer.bench_reference import reference_environment

pytestmark = pytest.mark.unit

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
MASK = "/root/.cache/amxtune/cpumask/libcpumask-0123.so"


def test_the_allocator_goes_and_the_mask_stays():
    env = reference_environment({"LD_PRELOAD": f"{TCMALLOC}:{MASK}", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == MASK
    assert env["PATH"] == "/bin" and env["HF_HUB_OFFLINE"] == "1"
    assert "OMP_NUM_THREADS" not in env


def test_only_an_allocator_leaves_no_preload():
    env = reference_environment({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
    assert "LD_PRELOAD" not in env


def test_several_processes_share_the_cores():
    env = reference_environment({}, processes=2)
    assert env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
