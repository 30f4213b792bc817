"""CPU features from /proc/cpuinfo, and the runtime's check of an INT8 bundle's form against
them (ONNX Runtime's u8s8 kernels saturate on x86 without VNNI)."""

from __future__ import annotations

import pytest

from ditarkit.runtime.backends.onnxrt import int8_form_problem
from ditarkit.runtime.machine import cpu_features, cpu_model, describe_features, saturates_u8s8

EPYC_AVX2 = """processor : 0
vendor_id : AuthenticAMD
model name : AMD EPYC 7B12
flags : fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2
"""
XEON_VNNI = """model name : Intel(R) Xeon(R) Platinum 8481C
flags : fpu sse2 avx avx2 avx512f avx512bw avx512_vnni amx_int8 amx_tile
"""
ALDER_LAKE = "model name : 12th Gen Intel(R) Core(TM) i7-1260P\nflags : avx avx2 avx_vnni\n"
GRAVITON = "processor : 0\nFeatures : fp asimd evtstrm aes crc32 asimddp sha512\nCPU part : 0xd0c\n"
CORTEX_A57 = "processor : 0\nFeatures : fp asimd evtstrm aes crc32\n"


@pytest.mark.parametrize(("cpuinfo", "arch", "want", "saturates"), [
    (EPYC_AVX2, "x86_64", {"AVX2": True, "AVX-512": False, "VNNI": False, "AMX-INT8": False}, True),
    (XEON_VNNI, "x86_64", {"AVX2": True, "AVX-512": True, "VNNI": True, "AMX-INT8": True}, False),
    (ALDER_LAKE, "x86_64", {"AVX2": True, "AVX-512": False, "VNNI": True, "AMX-INT8": False}, False),
    (GRAVITON, "aarch64", {"dot product": True}, False),
    (CORTEX_A57, "aarch64", {"dot product": False}, False),  # ARM's integer kernels have no 16-bit pairs
])
def test_features_are_read_from_cpuinfo(cpuinfo, arch, want, saturates):
    features = cpu_features(cpuinfo, arch)
    assert features == want
    assert saturates_u8s8(features) is saturates


def test_the_machine_line_names_each_feature_present_or_not():
    assert describe_features(cpu_features(EPYC_AVX2, "x86_64")) == "AVX2, no AVX-512, no VNNI, no AMX-INT8"
    assert describe_features(None) == "CPU features unknown"
    assert cpu_features("no flags here\n", "x86_64") is None and not saturates_u8s8(None)
    assert cpu_model(EPYC_AVX2) == "AMD EPYC 7B12"


AVX2 = cpu_features(EPYC_AVX2, "x86_64")
VNNI = cpu_features(XEON_VNNI, "x86_64")


@pytest.mark.parametrize(("quantization", "features", "warns"), [
    ({"target": "onnxruntime", "weight_type": "int8", "reduce_range": False}, AVX2, True),
    ({"target": "onnxruntime"}, AVX2, True),  # made before the kit recorded the form: 8-bit int8
    ({"target": "onnxruntime", "weight_type": "int8", "reduce_range": True}, AVX2, False),
    ({"target": "onnxruntime", "weight_type": "uint8", "reduce_range": False}, AVX2, False),
    ({"target": "onnxruntime", "weight_type": "int8", "reduce_range": False}, VNNI, False),
    ({"target": "tensorrt", "weight_type": "int8", "reduce_range": False}, AVX2, False),
    ({}, AVX2, False),  # fp32 and fp16 bundles
])
def test_an_int8_form_that_saturates_here_is_named(quantization, features, warns):
    problem = int8_form_problem(quantization, features)
    assert (problem is not None) is warns
    if warns:
        assert "without VNNI (AVX2, no AVX-512, no VNNI, no AMX-INT8)" in problem and "ditar-calibrate" in problem
