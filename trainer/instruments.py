"""Measurements the loop logs every few steps on top of the step's own metrics.

`quantization_sqnr` runs one extra forward of a micro-batch in eval mode through the unwrapped
(uncompiled) model, with hooks on every `QuantLinear` that measure the signal-to-quantization-noise
ratio of its weight and of the input it receives. Round-to-nearest throughout, so the measurement
never draws from the stochastic-rounding streams and does not change the training trajectory.
"""
from __future__ import annotations

import torch

from quant import QuantLinear


@torch.no_grad()
def quantization_sqnr(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """SQNR in dB per quantized layer (`sqnr/<layer>/weight`, `.../activation`) and their means."""
    measured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def measure(module: QuantLinear, args: tuple) -> None:
            for key, value in module.quantization_sqnr(args[0]).items():
                measured[f"sqnr/{name}/{key}"] = value
        return measure

    handles = [module.register_forward_pre_hook(hook(name))
               for name, module in model.named_modules() if isinstance(module, QuantLinear)]
    if not handles:
        return {}
    was_training = model.training
    model.eval()
    try:
        model(input_ids=batch["input_ids"])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    values = {key: float(value) for key, value in measured.items()}
    for kind in ("weight", "activation"):
        of_kind = [v for k, v in values.items() if k.endswith(f"/{kind}")]
        if of_kind:
            values[f"sqnr_{kind}_mean"] = sum(of_kind) / len(of_kind)
    return values
