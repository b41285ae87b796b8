"""What this CPU can do, and which of the trainer's fast paths it may use.

`probe()` reads two views of the CPU: the kernel's (/proc/cpuinfo: features the OS has enabled)
and PyTorch's (its cpuinfo library asks CPUID: what PyTorch and oneDNN choose kernels by). A
feature counts only when both list it, because either can be wrong on its own: a kernel too old
for AMX still shows AMX in CPUID, and an emulator or a hypervisor may show the host's
/proc/cpuinfo. AVX-NE-CONVERT is not listed by the kernel, so only CPUID tells.

`plan()` turns the probes of every rank plus the user's options into the paths the trainer takes
(precision, packed convolutions, torch.compile; channels_last and attention are reported) and
one notice line per path it had to turn off, saying what and why. `plan` is pure, so its rules
are unit-tested with the probe's answers substituted.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The features the trainer cares about, in /proc/cpuinfo's spelling.
FEATURES = (
    "amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx512bw", "avx512vl",
    "avx512dq", "avx_ne_convert", "avx2",
)
AVX512_BASE = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
AMX = ("amx_bf16", "amx_tile")
# torch.backends.cpu capability keys that are spelled differently from the kernel's flags.
TORCH_SPELLING = {"avx512f": "avx512_f", "avx512bw": "avx512_bw", "avx512vl": "avx512_vl",
                  "avx512dq": "avx512_dq"}
# Features the kernel does not list in /proc/cpuinfo: CPUID alone decides.
CPUID_ONLY = {"avx_ne_convert"}


def bf16_convolutions_possible(features: frozenset[str] | set[str]) -> bool:
    """oneDNN's bf16 convolutions (and so the packed ones) need AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT: PyTorch refuses them otherwise ("bf16 path needs the cpu support ...")."""
    return all(f in features for f in AVX512_BASE[1:]) or "avx_ne_convert" in features


@dataclass(frozen=True)
class CpuInfo:
    """One rank's CPU, as the kernel and CPUID agree on it."""

    vendor: str
    model_name: str
    features: frozenset[str]
    cpuid_name: str = ""
    torch_capability: str = ""
    # Features one view lists and the other does not (an emulator, an old kernel, a hypervisor).
    disagreements: tuple[str, ...] = ()
    bf16_convolutions: bool | None = None  # torch's own answer; None: derived from the flags

    def has(self, *names: str) -> bool:
        return all(name in self.features for name in names)

    @property
    def amx(self) -> bool:
        return self.has(*AMX)

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware: AMX tiles or AVX512-BF16 dot products."""
        return self.amx or self.has("avx512_bf16")

    @property
    def avx512(self) -> bool:
        return self.has(*AVX512_BASE)

    @property
    def can_pack_bf16_convolutions(self) -> bool:
        if self.bf16_convolutions is not None:
            return self.bf16_convolutions
        return bf16_convolutions_possible(self.features)

    @property
    def cpu_class(self) -> str:
        if self.amx:
            return "AMX"
        if self.has("avx512_bf16"):
            return "AVX512-BF16"
        if self.avx512:
            return "AVX-512"
        if self.has("avx2"):
            return "AVX2"
        return "pre-AVX2"

    def missing(self, *names: str) -> list[str]:
        return [name for name in names if name not in self.features]

    def summary(self) -> str:
        """One line: model, vendor and the instruction sets that matter here."""
        sets = [name for name, present in (
            ("AMX", self.amx), ("AVX512-BF16", self.has("avx512_bf16")),
            ("AVX-512", self.avx512), ("AVX-NE-CONVERT", self.has("avx_ne_convert")),
            ("AVX2", self.has("avx2")),
        ) if present]
        text = f"{self.model_name or 'unknown CPU'} ({self.vendor or 'unknown vendor'}): "
        text += ", ".join(sets) or "no AVX2"
        plain = self.model_name.lower().replace("(r)", "").replace("(tm)", "")
        first_word = (plain.split() or [""])[0]
        if self.cpuid_name and first_word not in self.cpuid_name.lower():
            text += f"; CPUID says {self.cpuid_name}"
        return text

    def to_dict(self) -> dict:
        data = asdict(self)
        data["features"] = sorted(self.features)
        data["disagreements"] = list(self.disagreements)
        data.update(cpu_class=self.cpu_class, native_bf16=self.native_bf16,
                    bf16_convolutions=self.can_pack_bf16_convolutions, summary=self.summary())
        return data


def read_proc_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, str, set[str] | None]:
    """(vendor, model name, flags) of the first processor; flags None when unreadable."""
    vendor = model = ""
    flags: set[str] | None = None
    try:
        text = Path(path).read_text()
    except OSError:
        return vendor, model, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
        if not line.strip() and flags is not None:
            break  # the first processor is enough: they are alike
    return vendor, model, flags


def _torch_view() -> tuple[dict | None, str, bool | None]:
    """torch's CPUID answers (None in builds without them: then the kernel's view alone
    counts), its dispatch level, and whether its bf16 convolutions run."""
    import torch

    try:
        capabilities: dict | None = dict(torch._C._cpu._get_cpu_capability())
    except (AttributeError, RuntimeError):
        capabilities = None
    level = torch.backends.cpu.get_cpu_capability()
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        bf16_conv = bool(check()) if check is not None else None
    except RuntimeError:
        bf16_conv = None
    if bf16_conv and not torch.backends.mkldnn.is_available():
        bf16_conv = False
    return capabilities, level, bf16_conv


def combine(vendor: str, model: str, kernel_flags: set[str] | None,
            cpuid: dict | None, capability: str = "", bf16_conv: bool | None = None) -> CpuInfo:
    """Merge the two views (either may be missing) into one CpuInfo."""
    features, disagreements = set(), []
    for name in FEATURES:
        in_cpuid = None if cpuid is None else bool(cpuid.get(TORCH_SPELLING.get(name, name)))
        in_kernel = None if kernel_flags is None or name in CPUID_ONLY else name in kernel_flags
        views = [v for v in (in_cpuid, in_kernel) if v is not None]
        if views and all(views):
            features.add(name)
        elif any(views):
            disagreements.append(f"{name}: {'CPUID' if in_cpuid else 'kernel'} only")
    if bf16_conv and not bf16_convolutions_possible(features):
        bf16_conv = False  # torch asked CPUID alone; the kernel disagrees
    return CpuInfo(
        vendor=vendor, model_name=model, features=frozenset(features),
        cpuid_name=str((cpuid or {}).get("cpu_name", "")), torch_capability=capability,
        disagreements=tuple(disagreements), bf16_convolutions=bf16_conv,
    )


def probe() -> CpuInfo:
    """This process's CPU (imports torch)."""
    vendor, model, flags = read_proc_cpuinfo()
    cpuid, capability, bf16_conv = _torch_view()
    return combine(vendor, model, flags, cpuid, capability, bf16_conv)


def machine_line(info: CpuInfo | None = None) -> str:
    """What a benchmark's figures came from, printed beside them: the CPU as the libraries see
    it (a masked CPU shows as such), the cores this process may use and the load right now."""
    info = info or probe()
    return (f"CPU: {info.summary()}; features: {' '.join(sorted(info.features)) or 'none'}; "
            f"PyTorch kernels: {info.torch_capability}; cores: {len(os.sched_getaffinity(0))}; "
            f"load average {os.getloadavg()[0]:.2f}")


def amx_missing(info: CpuInfo) -> str | None:
    """Why a job that requires AMX cannot run on this CPU, or None when it can."""
    if info.amx:
        return None
    return (f"this CPU ({info.summary()}) has no {', '.join(info.missing(*AMX))}, but the job "
            "requires AMX (workers.requireAmx): the node's AMX labels are wrong or stale")


def cpp_compiler() -> str | None:
    """The C++ compiler Inductor would use (torch.compile on CPU generates C++)."""
    for name in (os.environ.get("CXX"), "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@dataclass
class Plan:
    """The paths one rank takes, and why the others are off."""

    precision_requested: str
    precision: str  # "bf16" or "no" (fp32), as TrainingOptions.mixed_precision spells them
    precision_reason: str
    packed_convolutions: bool
    channels_last: bool
    torch_compile: bool
    attention: str
    notices: list[str] = field(default_factory=list)

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def label(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def to_dict(self) -> dict:
        return asdict(self)


def choose_precision(requested: str, cpus: list[CpuInfo]) -> tuple[str, str, list[str]]:
    """(precision, reason, notices). `auto` takes bf16 only when every rank's CPU computes
    bf16 natively: one rank without it would make the whole group wait for its emulation."""
    lacking = [c for c in cpus if not c.native_bf16]
    if len(cpus) == 1:
        who = "this CPU lacks"
    elif len(lacking) == len(cpus):
        who = "every rank's CPU lacks"
    else:
        who = f"{len(lacking)} of the {len(cpus)} ranks' CPUs lack"
    if requested == "bf16":
        if lacking:
            # measured per step on sd15-arch (docs/performance.md, "CPU classes")
            slower = "2.3x" if all(c.avx512 for c in lacking) else "35x"
            return "bf16", "asked for", [
                f"bf16 asked for, but {who} native bf16 (AMX or AVX512-BF16; "
                f"{lacking[0].summary()}): it trains correctly but about {slower} slower than "
                "fp32; mixedPrecision auto or no would choose fp32"
            ]
        return "bf16", "asked for", []
    if requested == "no":
        return "no", "asked for", []
    if not lacking:
        native = "AMX" if all(c.amx for c in cpus) else "AVX512-BF16"
        return "bf16", f"auto: {native} computes bf16 natively", []
    reason = f"auto: {who} native bf16 (AMX or AVX512-BF16)"
    return "no", reason, [f"mixed precision auto chose fp32: {who} native bf16 (AMX or "
                          "AVX512-BF16), so bf16 would run emulated and slower"]


def plan(cpus: list[CpuInfo], rank: int, requested_precision: str, channels_last: bool,
         torch_compile: bool, accelerator: str = "none", compiler: str | None = None,
         pack_fp32: bool = False) -> Plan:
    """Decide this rank's paths from every rank's CPU (`cpus[rank]` is this one's);
    `compiler`: the C++ compiler torch.compile would use (`cpp_compiler()`), if any;
    `pack_fp32`: fp32 convolutions are packed too (AMXTUNE_PACKED_CONV=all)."""
    cpu = cpus[rank]
    precision, reason, notices = choose_precision(requested_precision, cpus)
    bf16 = precision == "bf16"
    compile_on = torch_compile
    if torch_compile and compiler is None:
        compile_on = False
        notices.append("torch.compile off: no C++ compiler (g++ or clang++, or CXX) found, "
                       "which Inductor needs on CPUs")
    packed = (bf16 or pack_fp32) and accelerator == "none" and not compile_on
    if packed and bf16 and not cpu.can_pack_bf16_convolutions:
        packed = False
        notices.append("packed bf16 convolutions off: this CPU has no AVX-512 (BW, VL, DQ) or "
                       "AVX-NE-CONVERT, which oneDNN's bf16 convolutions need")
    # channels_last stays as asked on every CPU: measured, it is never slower (docs/
    # performance.md), even for bf16 convolutions in PyTorch's fallback kernels without AVX-512.
    return Plan(requested_precision, precision, reason, packed, channels_last, compile_on, "",
                notices)


def attention_backend(bf16: bool) -> tuple[str, str | None]:
    """Which kernel PyTorch's scaled_dot_product_attention (diffusers' default attention)
    picks here for a UNet-shaped input with gradients, and a notice when it is not the fused
    flash kernel (the math fallback materialises the whole attention matrix)."""
    import torch
    from torch.nn.attention import SDPBackend

    dtype = torch.bfloat16 if bf16 else torch.float32
    query = torch.zeros(1, 8, 64, 40, dtype=dtype, requires_grad=True)
    try:
        backend = SDPBackend(torch._fused_sdp_choice(query, query, query)).name.lower()
    except (AttributeError, RuntimeError, ValueError):
        return "unknown", None
    if backend == "flash_attention":
        return backend, None
    return backend, (f"attention runs in PyTorch's {backend} kernel, not the fused flash "
                     "kernel: slower and more memory per step")
