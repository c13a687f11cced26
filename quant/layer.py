"""Quantized linear layer: fake-quantized weights, activations and (optionally) gradients.

`QuantLinear` subclasses `nn.Linear` and reuses the original Parameter objects, so parameter
names, `state_dict` keys (HF-compatible) and optimizer bindings are unchanged by conversion.
The GEMMs run on the dequantized operands, so autograd gives dX = G W_q and dW = G^T X_q, as in
the official code; the straight-through estimator passes dL/dW_q and dL/dX_q on to W and X.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quant.functional import fake_quantize, hadamard_rotate, quantize_with_mask
from quant.spec import QuantConfigError, QuantSpec

ESTIMATORS = ("ste", "clipped_ste")


class RoundingStreams:
    """Seeded torch.Generators (one per device) that drive stochastic rounding.

    One instance is shared by all layers of a converted model; its state is checkpointed so a
    resumed run draws exactly the noise the uninterrupted run would have drawn. Generators are
    created lazily because the model is converted on CPU and moved to its device afterwards.
    Caveat: activation checkpointing recomputes the forward with fresh noise.
    """

    def __init__(self, seed: int = 0, rank: int = 0) -> None:
        self._generators: dict[str, torch.Generator] = {}
        self._pending_states: dict[str, torch.Tensor] = {}
        self.seed(seed, rank)

    def seed(self, seed: int, rank: int = 0) -> None:
        """Restart every stream from (seed, rank): distinct across ranks, reproducible."""
        self.base_seed, self.rank = int(seed), int(rank)
        mixed = np.random.SeedSequence([self.base_seed, self.rank]).generate_state(1, np.uint64)
        self._derived_seed = int(mixed[0])
        self._pending_states.clear()
        for generator in self._generators.values():
            generator.manual_seed(self._derived_seed)

    def generator(self, device: torch.device | str) -> torch.Generator:
        key = _device_key(device)
        if key not in self._generators:
            generator = torch.Generator(device=key)
            generator.manual_seed(self._derived_seed)
            if key in self._pending_states:
                generator.set_state(self._pending_states.pop(key))
            self._generators[key] = generator
        return self._generators[key]

    def state_dict(self) -> dict:
        states = dict(self._pending_states)
        states.update({key: g.get_state() for key, g in self._generators.items()})
        return {"seed": self.base_seed, "rank": self.rank, "generator_states": states}

    def load_state_dict(self, state: dict) -> None:
        self.seed(state["seed"], state["rank"])
        for key, generator_state in state["generator_states"].items():
            if key in self._generators:
                self._generators[key].set_state(generator_state)
            else:
                self._pending_states[key] = generator_state


def _device_key(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized tensor. Backward: the gradient unchanged (STE) or zeroed where the
    input was clipped (clipped STE; the mask lives in the rotated basis when rotated)."""

    @staticmethod
    def forward(ctx, x, quantized, in_range, hadamard_size):
        ctx.hadamard_size = hadamard_size
        ctx.save_for_backward(in_range)
        return quantized

    @staticmethod
    def backward(ctx, grad):
        (in_range,) = ctx.saved_tensors
        if in_range is None:
            return grad, None, None, None
        if ctx.hadamard_size:
            rotated = hadamard_rotate(grad.float(), ctx.hadamard_size) * in_range
            return hadamard_rotate(rotated, ctx.hadamard_size).to(grad.dtype), None, None, None
        return grad * in_range, None, None, None


class _QuantizeGradient(torch.autograd.Function):
    """Identity forward; fake-quantizes the incoming output gradient G before both backward
    GEMMs (dX = q(G) W_q, dW = q(G)^T X_q)."""

    @staticmethod
    def forward(ctx, output, spec, streams):
        ctx.spec, ctx.streams = spec, streams
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        generator = ctx.streams.generator(grad.device) if ctx.spec.stochastic else None
        return fake_quantize(grad, ctx.spec, generator), None, None


class QuantLinear(nn.Linear):
    """nn.Linear whose forward uses fake-quantized operands (see module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        weight_spec: Optional[QuantSpec] = None,
        activation_spec: Optional[QuantSpec] = None,
        gradient_spec: Optional[QuantSpec] = None,
        estimator: str = "ste",
        streams: Optional[RoundingStreams] = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if estimator not in ESTIMATORS:
            raise QuantConfigError(f"quant estimator={estimator!r} must be one of {ESTIMATORS}")
        self.weight_spec = (weight_spec or QuantSpec()).validate("weight").resolved()
        self.activation_spec = (activation_spec or QuantSpec()).validate("activation").resolved()
        self.gradient_spec = (gradient_spec or QuantSpec()).validate("gradient").resolved()
        self.estimator = estimator
        self.streams = streams or RoundingStreams()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "QuantLinear":
        """Wrap an existing nn.Linear, sharing (not copying) its weight and bias Parameters."""
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, device="meta",
            **kwargs,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def _quantize(self, tensor: torch.Tensor, spec: QuantSpec, is_weight: bool) -> torch.Tensor:
        if not spec.enabled:
            return tensor
        generator = self.streams.generator(tensor.device) if spec.stochastic else None
        clipped = self.estimator == "clipped_ste"
        with torch.no_grad():
            quantized, in_range = quantize_with_mask(tensor.detach(), spec, generator, clipped)
        if not tensor.requires_grad:
            return quantized
        if is_weight and spec.format.endswith("_official"):
            # The official layer's STE, kept op for op: its forward value is (q + w) - w.
            return quantized + tensor - tensor.detach()
        return _StraightThrough.apply(tensor, quantized, in_range, spec.hadamard_size)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self._quantize(self.weight, self.weight_spec, is_weight=True)
        activation = self._quantize(input, self.activation_spec, is_weight=False)
        output = F.linear(activation, weight, self.bias)
        if self.gradient_spec.enabled and output.requires_grad:
            output = _QuantizeGradient.apply(output, self.gradient_spec, self.streams)
        return output

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, W={self.weight_spec.summary()}, "
            f"A={self.activation_spec.summary()}, G={self.gradient_spec.summary()}, "
            f"estimator={self.estimator}"
        )
