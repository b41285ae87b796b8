"""How much memory a rank may still take: the tightest of its cgroups and the machine."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from amxtune_trainer.runtime import free_memory_mb

pytestmark = pytest.mark.unit
GIB = 2**30


def write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)


def proc(tmp_path: Path, cgroup: str, available_gib: int = 20) -> Path:
    root = tmp_path / "proc"
    write(root / "self", cgroup=cgroup)
    (root / "meminfo").write_text(f"MemTotal: 1 kB\nMemAvailable: {available_gib * 2**20} kB\n")
    return root


def test_cgroup_v2_takes_the_tightest_ancestor_and_counts_inactive_cache_as_free(tmp_path):
    cgroups = tmp_path / "cg"
    write(cgroups, **{"cgroup.controllers": "memory"})
    pod = cgroups / "kubepods" / "pod1"
    write(pod, memory_max=str(12 * GIB), memory_current=str(5 * GIB),
          memory_stat=f"anon 1\ninactive_file {1 * GIB}\n")
    write(pod / "trainer", memory_max="max", memory_current=str(5 * GIB),
          memory_stat="inactive_file 0\n")
    found = free_memory_mb(proc(tmp_path, "0::/kubepods/pod1/trainer\n"), cgroups)
    assert found == 8 * 1024  # 12 - 5 + 1 GiB: the pod's limit, not the machine's 20


def test_cgroup_v1_memory_hierarchy_and_no_limit(tmp_path):
    cgroups = tmp_path / "cg"
    group = cgroups / "memory" / "docker" / "c1"
    write(group, memory_limit_in_bytes=str(6 * GIB), memory_usage_in_bytes=str(2 * GIB),
          memory_stat="total_inactive_file 0\n")
    write(cgroups / "memory", memory_limit_in_bytes=str(2**63 - 4096),
          memory_usage_in_bytes="1", memory_stat="total_inactive_file 0\n")
    lines = "5:cpu:/docker/c1\n4:memory:/docker/c1\n0::/\n"
    assert free_memory_mb(proc(tmp_path, lines), cgroups) == 4 * 1024
    # no limit anywhere: the machine's available memory
    assert free_memory_mb(proc(tmp_path, "4:memory:/\n", 3), cgroups) == 3 * 1024


def test_fp32_convolutions_are_packed_only_where_a_ranks_share_holds_them():
    from amxtune_trainer.fastconv import room_to_pack

    # measured on sd15-arch at 256 px (docs/performance.md): copies 4.4 GiB, a step 3.1 GiB
    # given back to the allocator's system; 12 GiB free for one rank: packs
    fits, why = room_to_pack(4400, 7700, 4600, 12 * 1024, 1)
    assert fits and "they take 4.3 GiB and a step 3.0 GiB more" in why
    assert not room_to_pack(4400, 7700, 4600, 12 * 1024, 2)[0]  # two ranks share it
    assert room_to_pack(4400, 7700, 7700, 12 * 1024, 2)[0]  # the allocator kept the step's
    assert room_to_pack(4400, None, 4600, 12 * 1024, 1) == (
        False, "memory could not be measured here")


def test_a_phase_peak_is_measured_apart_and_the_whole_life_peak_is_kept():
    from amxtune_trainer import runtime

    block = mmap.mmap(-1, 300 * 2**20)  # whatever the allocator: mapped, touched, unmapped
    block.write(b"x" * len(block))
    block.close()
    life_peak = runtime.peak_rss_mb()
    assert runtime.reset_peak_rss()
    phase = runtime.phase_peak_rss_mb()
    assert phase is not None and phase < life_peak - 200
    assert runtime.peak_rss_mb() == pytest.approx(life_peak, abs=1)
