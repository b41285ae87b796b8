"""The CPU probe's merging rules and every fast-path decision, with the probe's answers
substituted for the CPU classes amxtune meets (AMX, AVX-512 without BF16, AVX2 only)."""

from __future__ import annotations

import pytest

from amxtune_trainer import cpu

pytestmark = pytest.mark.unit

AVX2 = {"avx2"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
AMX = AVX512_BF16 | {"amx_bf16", "amx_tile", "amx_int8"}


def info(features: set[str], model: str = "Test CPU") -> cpu.CpuInfo:
    return cpu.CpuInfo(vendor="GenuineIntel", model_name=model, features=frozenset(features),
                       torch_capability="AVX2")


def plan_for(features: set[str], precision: str = "auto", **kwargs) -> cpu.Plan:
    options = {"channels_last": True, "torch_compile": False, "compiler": "/usr/bin/g++"}
    options.update(kwargs)
    return cpu.plan([info(features)], 0, precision, **options)


def torch_view(features: set[str]) -> dict:
    """What torch._C._cpu._get_cpu_capability() answers, in its own spelling."""
    spelled = {cpu.TORCH_SPELLING.get(f, f) for f in features}
    return {"cpu_name": "Test CPU", **{name: True for name in spelled}}


@pytest.mark.parametrize(("features", "cpu_class", "native"), [
    (AMX, "AMX", True), (AVX512_BF16, "AVX512-BF16", True), (AVX512, "AVX-512", False),
    (AVX2, "AVX2", False), (set(), "pre-AVX2", False),
])
def test_cpu_classes(features, cpu_class, native):
    probed = cpu.combine("GenuineIntel", "Test CPU", features, torch_view(features))
    assert probed.cpu_class == cpu_class
    assert probed.native_bf16 is native
    assert probed.features == frozenset(features)


def test_a_feature_counts_only_when_the_kernel_and_cpuid_agree():
    # An old kernel that does not enable AMX: CPUID has it, /proc/cpuinfo does not.
    old_kernel = cpu.combine("GenuineIntel", "Xeon", AVX512_BF16, torch_view(AMX))
    assert not old_kernel.amx and old_kernel.cpu_class == "AVX512-BF16"
    assert "amx_bf16: CPUID only" in old_kernel.disagreements
    # An emulator showing the host's /proc/cpuinfo but answering CPUID for an AVX2 CPU.
    emulated = cpu.combine("GenuineIntel", "Xeon", AMX, torch_view(AVX2), bf16_conv=True)
    assert emulated.cpu_class == "AVX2"
    assert not emulated.can_pack_bf16_convolutions  # torch's answer is overruled as well
    # AVX-NE-CONVERT is CPUID's alone: the kernel does not list it.
    ne_convert = cpu.combine("GenuineIntel", "Xeon", AVX2, torch_view(AVX2 | {"avx_ne_convert"}))
    assert ne_convert.has("avx_ne_convert") and ne_convert.can_pack_bf16_convolutions
    # Either view alone is used when the other is missing.
    assert cpu.combine("", "", None, torch_view(AMX)).amx
    assert cpu.combine("", "", AMX, None).amx


def test_proc_cpuinfo_is_read_for_vendor_model_and_flags(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7763 "
                    "64-Core Processor\nflags\t\t: fpu sse avx avx2 fma\n\nprocessor\t: 1\n")
    assert cpu.read_proc_cpuinfo(str(path)) == (
        "AuthenticAMD", "AMD EPYC 7763 64-Core Processor", {"fpu", "sse", "avx", "avx2", "fma"})
    assert cpu.read_proc_cpuinfo(str(tmp_path / "missing")) == ("", "", None)


def test_summary_names_the_cpu_and_its_instruction_sets():
    epyc = cpu.CpuInfo("AuthenticAMD", "AMD EPYC 7763 64-Core Processor", frozenset(AVX2),
                       cpuid_name="AMD EPYC 7763")
    assert epyc.summary() == "AMD EPYC 7763 64-Core Processor (AuthenticAMD): AVX2"
    xeon = cpu.CpuInfo("GenuineIntel", "Intel(R) Xeon(R) Platinum 8480+", frozenset(AMX),
                       cpuid_name="Intel Xeon Platinum 8480+")
    assert xeon.summary().endswith("AMX, AVX512-BF16, AVX-512, AVX2")
    emulated = cpu.CpuInfo("GenuineIntel", "Intel(R) Xeon(R)", frozenset(AVX2),
                           cpuid_name="AMD QEMU TCG")
    assert emulated.summary().endswith("; CPUID says AMD QEMU TCG")


def test_amx_cpu_keeps_every_fast_path():
    chosen = plan_for(AMX)
    assert (chosen.precision, chosen.label) == ("bf16", "bf16")
    assert chosen.precision_reason == "auto: AMX computes bf16 natively"
    assert chosen.packed_convolutions and chosen.channels_last
    assert chosen.notices == []


def test_avx512_bf16_without_amx_chooses_bf16_too():
    chosen = plan_for(AVX512_BF16)
    assert chosen.bf16 and chosen.precision_reason == "auto: AVX512-BF16 computes bf16 natively"
    assert chosen.packed_convolutions


@pytest.mark.parametrize("features", [AVX512, AVX2], ids=["avx512-no-bf16", "avx2"])
def test_auto_chooses_fp32_without_native_bf16_and_says_so(features):
    chosen = plan_for(features)
    assert chosen.precision == "no" and chosen.label == "fp32"
    assert not chosen.packed_convolutions  # fp32 ones only when asked (memory for little)
    assert plan_for(features, pack_fp32=True).packed_convolutions
    assert chosen.channels_last
    assert len(chosen.notices) == 1
    assert "auto chose fp32: this CPU lacks native bf16" in chosen.notices[0]


def test_explicit_bf16_without_avx512_runs_unpacked_with_two_notices():
    chosen = plan_for(AVX2, "bf16")
    assert chosen.bf16 and chosen.precision_reason == "asked for"
    assert not chosen.packed_convolutions
    assert chosen.channels_last  # measured faster even in PyTorch's fallback bf16 kernels
    assert [n.split(":")[0] for n in chosen.notices] == [
        "bf16 asked for, but this CPU lacks native bf16 (AMX or AVX512-BF16; Test CPU "
        "(GenuineIntel)",
        "packed bf16 convolutions off",
    ]
    assert "no AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT" in chosen.notices[1]
    assert "about 35x slower than fp32" in chosen.notices[0]


def test_explicit_bf16_on_avx512_without_bf16_keeps_packed_convolutions():
    chosen = plan_for(AVX512, "bf16")
    assert chosen.bf16 and chosen.packed_convolutions  # oneDNN runs bf16 there (emulated)
    assert len(chosen.notices) == 1 and "about 2.3x slower than fp32" in chosen.notices[0]


def test_explicit_fp32_is_fp32_everywhere():
    for features in (AMX, AVX2):
        chosen = plan_for(features, "no")
        assert chosen.precision == "no" and chosen.notices == []


def test_torch_compile_needs_a_compiler_and_replaces_packing():
    assert not plan_for(AMX, torch_compile=True).packed_convolutions
    assert plan_for(AMX, torch_compile=True).torch_compile
    without = plan_for(AMX, torch_compile=True, compiler=None)
    assert not without.torch_compile and without.packed_convolutions
    assert without.notices == ["torch.compile off: no C++ compiler (g++ or clang++, or CXX) "
                               "found, which Inductor needs on CPUs"]


def test_ipex_keeps_its_own_kernels():
    assert not plan_for(AMX, accelerator="ipex").packed_convolutions


def test_precision_is_decided_for_every_rank_together():
    mixed = [info(AMX, "Xeon"), info(AVX2, "EPYC")]
    on_amx = cpu.plan(mixed, 0, "auto", True, False, compiler=None)
    on_epyc = cpu.plan(mixed, 1, "auto", True, False, compiler=None)
    assert on_amx.precision == on_epyc.precision == "no"
    assert "1 of the 2 ranks' CPUs lack native bf16" in on_amx.precision_reason
    nowhere = cpu.plan([info(AVX2)] * 2, 1, "auto", True, False, compiler=None)
    assert nowhere.precision_reason == "auto: every rank's CPU lacks native bf16 (AMX or " \
        "AVX512-BF16)"
    everywhere = cpu.plan([info(AMX)] * 4, 2, "auto", True, False, compiler=None)
    assert everywhere.bf16 and everywhere.packed_convolutions
    asked = cpu.plan(mixed, 1, "bf16", True, False, compiler=None)
    assert asked.bf16 and not asked.packed_convolutions  # this rank's CPU cannot pack
    assert cpu.plan(mixed, 0, "bf16", True, False, compiler=None).packed_convolutions


def test_amx_missing_names_what_is_missing_and_why_it_matters():
    assert cpu.amx_missing(info(AMX)) is None
    message = cpu.amx_missing(info(AVX512_BF16, "Intel(R) Xeon(R) Gold 6330"))
    assert "has no amx_bf16, amx_tile" in message
    assert "workers.requireAmx" in message and "labels are wrong or stale" in message
