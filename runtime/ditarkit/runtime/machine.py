"""What this CPU offers the integer kernels: read from the OS with the standard library only.

ONNX Runtime picks its INT8 matmul kernels by CPU feature, and they differ in more than
speed: on x86 without VNNI its u8s8 kernels add pairs of products in saturating 16-bit
lanes. Benchmarks and calibration reports therefore name the features, and the runtime
checks an INT8 bundle's form against them.
"""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# Feature -> the /proc/cpuinfo flags that provide it (any one suffices).
X86_FEATURES = {
    "AVX2": ("avx2",),
    "AVX-512": ("avx512f",),
    "VNNI": ("avx512_vnni", "avx_vnni"),  # 8-bit dot products into 32 bits: no 16-bit saturation
    "AMX-INT8": ("amx_int8",),
}
ARM_FEATURES = {"dot product": ("asimddp",)}  # SDOT/UDOT (ARMv8.2+)


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's feature flags (x86 `flags`, ARM `Features`), or None where the OS does not say."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(errors="replace")
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def cpu_features(cpuinfo: str | None = None, arch: str | None = None) -> dict[str, bool] | None:
    """The features that matter to the INT8 kernels, each present or not; None where unknown
    (no /proc/cpuinfo: macOS, Windows)."""
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return None
    arch = (arch or platform.machine()).lower()
    table = ARM_FEATURES if arch in ("aarch64", "arm64") or arch.startswith("arm") else X86_FEATURES
    return {name: any(flag in flags for flag in names) for name, names in table.items()}


def describe_features(features: dict[str, bool] | None) -> str:
    """"AVX2, AVX-512, VNNI, no AMX-INT8", or "CPU features unknown"."""
    if features is None:
        return "CPU features unknown"
    return ", ".join(name if present else f"no {name}" for name, present in features.items())


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name ("AMD EPYC 7B13"), or the platform's processor name."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware"):
            return value.strip()
    return platform.processor() or platform.machine()


def cpu_summary() -> str:
    """Model and INT8-relevant features, for a report's machine line."""
    return f"{cpu_model()} ({describe_features(cpu_features())})"


def saturates_u8s8(features: dict[str, bool] | None) -> bool:
    """Whether ONNX Runtime's u8s8 kernels here add products in saturating 16-bit lanes:
    x86 with AVX2 but no VNNI (AVX-512 without VNNI included)."""
    return features is not None and features.get("AVX2", False) and not features.get("VNNI", False)
