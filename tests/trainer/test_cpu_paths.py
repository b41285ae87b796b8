"""Training on whatever CPU CI has, and on a CPU without AVX-512 (CPUID masked, see
tests/support/cpumask.py): precision auto, explicit bf16 anywhere, requireAmx, reporting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import BASE_ARGS, events, run_trainer, trainer_env

from amxtune_trainer import cpu

pytestmark = pytest.mark.trainer


def args_for(tmp_path, concept_dir, precision: str, *extra: str) -> list[str]:
    base = list(BASE_ARGS)
    base[base.index("--mixed-precision") + 1] = precision
    return [*base, "--train-data-dir", str(concept_dir), "--output-dir", str(tmp_path / "out"),
            "--max-train-steps", "3", "--learning-rate", "0.05", "--seed", "4",
            "--eval-samples", "2", *extra]


def notices(stderr: str) -> list[str]:
    marker = "amxtune-train textual-inversion: notice: "
    return [line.removeprefix(marker) for line in stderr.splitlines() if line.startswith(marker)]


@pytest.fixture(scope="module")
def this_cpu() -> cpu.CpuInfo:
    return cpu.probe()


def test_auto_trains_in_the_precision_this_cpu_supports(tmp_path, tiny_model, concept_dir,
                                                         this_cpu):
    result = run_trainer(args_for(tmp_path, concept_dir, "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    expected = "bf16" if this_cpu.native_bf16 else "fp32"
    assert metrics["mixed_precision"]["requested"] == "auto"
    assert metrics["mixed_precision"]["used"] == expected
    assert metrics["cpu"]["cpu_class"] == this_cpu.cpu_class
    assert metrics["cpu_per_rank"] == [this_cpu.summary()]
    # On AMX (or AVX512-BF16) the packed bf16 convolutions are used, and metrics say so.
    packs = expected == "bf16" and this_cpu.can_pack_bf16_convolutions
    assert metrics["fast_paths"]["packed_convolutions"] is packs
    assert (metrics["packed_convolutions"] > 0) is packs
    started = events(result.stdout)[0]  # the first JSON line says what was chosen, and why
    assert started["event"] == "started"
    assert started["precision"] == expected and started["cpu"] == this_cpu.summary()
    assert started["notices"] == notices(result.stderr) == metrics["notices"]


def test_without_avx512_auto_chooses_fp32_and_says_why_once(tmp_path, tiny_model, concept_dir,
                                                             avx2_cpu):
    result = run_trainer(args_for(tmp_path, concept_dir, "auto"), env=trainer_env(**avx2_cpu))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["cpu"]["cpu_class"] == "AVX2"
    assert metrics["mixed_precision"]["used"] == "fp32"
    assert metrics["packed_convolutions"] == 0
    assert notices(result.stderr) == [
        "mixed precision auto chose fp32: this CPU lacks native bf16 (AMX or AVX512-BF16), so "
        "bf16 would run emulated and slower"]
    assert [p["step"] for p in metrics["eval_loss"]] == [0, 3]


def test_fp32_convolutions_are_packed_when_asked_and_learn_the_same(tmp_path, tiny_model,
                                                                   concept_dir):
    """AMXTUNE_PACKED_CONV=all packs the fp32 UNet too; the losses stay what eager gives."""
    runs = {}
    for setting in ("all", "bf16"):
        out = tmp_path / setting
        result = run_trainer(args_for(out, concept_dir, "no"),
                             env=trainer_env(AMXTUNE_PACKED_CONV=setting))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[setting] = json.loads((out / "out" / "metrics.json").read_text())
    packed, eager = runs["all"], runs["bf16"]
    assert packed["fast_paths"]["packed_convolutions"] and packed["packed_convolutions"] > 0
    assert not eager["fast_paths"]["packed_convolutions"] and eager["packed_convolutions"] == 0
    for before, after in zip(eager["history"], packed["history"], strict=True):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-4)


def test_without_avx512_explicit_bf16_still_trains(tmp_path, tiny_model, concept_dir,
                                                   avx2_cpu):
    """The crash users saw (mkldnn_reorder_conv2d_weight: bf16 path needs avx512...)."""
    result = run_trainer(args_for(tmp_path, concept_dir, "bf16"), env=trainer_env(**avx2_cpu))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["mixed_precision"] == {"requested": "bf16", "used": "bf16",
                                          "reason": "asked for"}
    assert metrics["packed_convolutions"] == 0 and metrics["steps"] == 3
    lines = notices(result.stderr)
    assert len(lines) == 2
    assert lines[0].startswith("bf16 asked for, but this CPU lacks native bf16")
    assert lines[1].startswith("packed bf16 convolutions off: this CPU has no AVX-512")
    assert all(p["loss"] == p["loss"] for p in metrics["history"])  # finite, not NaN
    assert (tmp_path / "out" / "learned_embeds.safetensors").is_file()


def test_a_node_without_amx_stops_at_once_when_the_job_requires_it(tmp_path, tiny_model,
                                                                   concept_dir, avx2_cpu):
    result = run_trainer(args_for(tmp_path, concept_dir, "auto", "--require-amx"), ranks=2,
                         env=trainer_env(**avx2_cpu))
    assert result.returncode == 3, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr  # the ranks' one line (printed once) and the launcher
    assert lines[0].startswith("amxtune-train textual-inversion: node lacks AMX: this CPU (")
    assert "has no amx_bf16, amx_tile" in lines[0] and "workers.requireAmx" in lines[0]
    assert lines[1] == "amxtune-train launch: ranks 0, 1 exited with code 3"
    assert not (tmp_path / "out").exists()  # nothing loaded, nothing written


def test_require_amx_on_this_cpu(tmp_path, tiny_model, concept_dir, this_cpu):
    result = run_trainer(args_for(tmp_path, concept_dir, "auto", "--require-amx"))
    if this_cpu.amx:
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        assert result.returncode == 3 and "node lacks AMX" in result.stderr


def test_doctor_reports_the_probe_and_the_plan(avx2_cpu):
    from tests.support.cpumask import masks_cpuid, probe

    masked = probe(avx2_cpu)
    assert masked["cpu_class"] == "AVX2" and masked["features"] == ["avx2"]
    assert not masked["bf16_convolutions"]
    # one view still lists AVX-512 (the mask changes CPUID where it can, else the kernel's
    # view): the probe says which
    if "avx512f" in Path("/proc/cpuinfo").read_text():
        masked_view = "kernel only" if masks_cpuid() else "CPUID only"
        assert f"avx512f: {masked_view}" in masked["disagreements"]
