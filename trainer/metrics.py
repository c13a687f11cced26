"""Throughput accounting: MFU against the tensor-core peak of the precision a run actually uses.

bf16 runs (`bf16_mixed`, `pure_bf16`, and the fake-quantized 4-bit formats, whose GEMMs run on
dequantized bf16/fp32 operands) count against the dense bf16 peak; fp32 runs against the TF32 peak
when PyTorch is allowed to use TF32 for matmuls, else MFU is None (plain fp32 has no tensor-core
peak). FP8 runs are counted against the bf16 peak too, the usual convention for comparing recipes.
"""
from __future__ import annotations

import torch

# Dense (no sparsity) tensor-core peaks in FLOP/s from the vendors' datasheets: (bf16, tf32).
_PEAK_FLOPS = (
    ("H200", 989e12, 494.7e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494.7e12),
    ("GH200", 989e12, 494.7e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("A10G", 70e12, 35e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("RTX 4090", 165e12, 82.6e12),
)


def device_peak_flops(device: torch.device, precision: str = "bf16_mixed") -> float | None:
    """The dense tensor-core peak of a CUDA device for `precision`, or None where none applies (CPU,
    fp32 without TF32, an unknown GPU)."""
    if device.type != "cuda":
        return None
    if precision == "fp32" and torch.get_float32_matmul_precision() == "highest":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bf16, tf32 in _PEAK_FLOPS:
        if key in name:
            return tf32 if precision == "fp32" else bf16
    return None


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
