"""Throughput accounting: MFU against the dense bf16 peak of the detected GPU."""
from __future__ import annotations

import torch

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' datasheets.
_BF16_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("V100", 125e12),
)


def device_peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device, or None where no meaningful peak is known (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _BF16_PEAK_FLOPS:
        if key in name:
            return flops
    return None


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
