"""Quantized linear layer: fake-quantized operands in each of its three GEMMs.

`QuantLinear` subclasses `nn.Linear` and reuses the original Parameter objects, so parameter
names, `state_dict` keys (HF-compatible) and optimizer bindings are unchanged by conversion.
Its three GEMMs are written out (`_QuantLinearFunction`): Y = X_q W_q^T, dX = q(dY) q(W^T)^T and
dW = q(dY^T) q(X^T)^T, every operand quantized along its GEMM's reduction dimension as the
layer's `GemmPlan` says (quant.gemms; by default the backward reuses W_q and X_q, as the official
code); the straight-through estimator passes dL/dW_q and dL/dX_q on to W and X.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quant.functional import fake_quantize, hadamard_rotate, quantize_with_mask, random_signs
from quant.gemms import GemmPlan, GemmSpecs, eval_spec, resolve_gemms
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


def _straight_through(grad, in_range, hadamard_size):
    """dL/dX from dL/dX_q: unchanged (STE), or zeroed where X was clipped (clipped STE; the mask
    lives in the rotated basis when rotated)."""
    if in_range is None:
        return grad
    if hadamard_size:
        rotated = hadamard_rotate(grad.float(), hadamard_size) * in_range
        return hadamard_rotate(rotated, hadamard_size).to(grad.dtype)
    return grad * in_range


class _Backward(NamedTuple):
    """What the backward of one QuantLinear call needs besides the saved tensors: each backward
    GEMM's operand specs (see quant.gemms; None = reuse the forward's W_q / X_q) and the rotations
    of W's and X's straight-through masks."""

    dgrad_grad_output: QuantSpec  # dY in dX = dY W: blocks along out_features
    dgrad_weight: Optional[QuantSpec]  # W^T in dX = dY W: blocks along out_features
    wgrad_grad_output: QuantSpec  # dY^T in dW = dY^T X: blocks along the tokens
    wgrad_input: Optional[QuantSpec]  # X^T in dW = dY^T X: blocks along the tokens
    streams: RoundingStreams
    input_hadamard: int
    weight_hadamard: int
    unquantized_forward: bool = False  # the bf16-forward phase: Y = X W^T on the unquantized X and W


def _gemm_operands(a, a_spec, b, b_spec, streams):
    """Quantize the two operands of one GEMM, each along its last dimension (the GEMM's reduction;
    callers pass transposes where needed). A spec of None passes the operand through (reused).
    Draw order from the streams: the GEMM's random signs, then a's noise, then b's."""
    fresh = [s for s in (a_spec, b_spec) if s is not None and s.enabled]
    random = next((s for s in fresh if s.hadamard_random), None)
    signs = None
    if random is not None:
        signs = random_signs(random.hadamard_size, streams.generator(a.device), a.device)
    out = []
    for t, spec in ((a, a_spec), (b, b_spec)):
        if spec is None or not spec.enabled:
            out.append(t)
            continue
        generator = streams.generator(t.device) if spec.stochastic else None
        out.append(fake_quantize(t, spec, generator, signs))
    return out


class _QuantLinearFunction(torch.autograd.Function):
    """The three GEMMs of a linear layer on fake-quantized operands.

    forward  Y  = X_q W_q^T + b
    dgrad    dX = q(dY) q(W^T)^T, then X's straight-through estimator
    wgrad    dW = q(dY^T) q(X^T)^T, then W's straight-through estimator
    bias     db = sum of dY over the tokens (a reduction, no GEMM: dY unquantized)

    dY is (tokens, out_features) with the leading dims flattened. Each GEMM quantizes its
    operands along its own reduction dimension: out_features for dgrad, the tokens for wgrad;
    q(W^T) and q(X^T) default to the forward's W_q and X_q (plan slots None). W_q and X_q are
    quantized by the caller, outside this Function, so that a stochastic forward's noise draws
    (kept out of compiled graphs) do not take the GEMMs with them. The GEMMs run in the autocast
    dtype when autocast is on, like F.linear, and gradients are returned in the dtypes of X, W
    and b.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, input_q, weight_q, input_in_range, weight_in_range, plan):
        device_type = input_q.device.type
        dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else input_q.dtype
        )
        input_q, weight_q = input_q.to(dtype), weight_q.to(dtype)
        # The backward re-quantizes the high-precision W / X when its slot is not a reuse.
        input_b = input_q if plan.wgrad_input is None else input.detach().to(dtype)
        weight_b = weight_q if plan.dgrad_weight is None else weight.detach().to(dtype)
        ctx.save_for_backward(input_b, weight_b, input_in_range, weight_in_range)
        ctx.plan = plan
        ctx.dtypes = (input.dtype, weight.dtype, None if bias is None else bias.dtype)
        if plan.unquantized_forward:
            input_q, weight_q = input.detach().to(dtype), weight.detach().to(dtype)
        return F.linear(input_q, weight_q, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_output):
        input_b, weight_b, input_in_range, weight_in_range = ctx.saved_tensors
        plan = ctx.plan
        input_dtype, weight_dtype, bias_dtype = ctx.dtypes
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_q, weight_t_q = _gemm_operands(
                grad, plan.dgrad_grad_output, weight_b.t(), plan.dgrad_weight, plan.streams
            )
            grad_input = (grad_q @ weight_t_q.t()).reshape(input_b.shape)
            grad_input = _straight_through(grad_input, input_in_range, plan.input_hadamard)
            grad_input = grad_input.to(input_dtype)
        if ctx.needs_input_grad[1]:
            grad_t_q, input_t_q = _gemm_operands(
                grad.t(), plan.wgrad_grad_output, input_b.reshape(-1, input_b.shape[-1]).t(),
                plan.wgrad_input, plan.streams,
            )
            grad_weight = grad_t_q @ input_t_q.t()
            grad_weight = _straight_through(grad_weight, weight_in_range, plan.weight_hadamard)
            grad_weight = grad_weight.to(weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0).to(bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


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
        gemms: Optional[GemmSpecs] = None,
        estimator: str = "ste",
        streams: Optional[RoundingStreams] = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if estimator not in ESTIMATORS:
            raise QuantConfigError(f"quant estimator={estimator!r} must be one of {ESTIMATORS}")
        self.plan: GemmPlan = resolve_gemms(
            weight_spec or QuantSpec(), activation_spec or QuantSpec(), gradient_spec or QuantSpec(),
            gemms, estimator,
        )
        self.weight_spec = self.plan.forward_weight
        self.activation_spec = self.plan.forward_input
        self.estimator = estimator
        self.streams = streams or RoundingStreams()
        self.high_precision: Optional[str] = None
        """The precision policy's bf16 phase: "all" = a plain nn.Linear forward and backward;
        "forward" = the forward GEMM on unquantized X and W, the backward GEMMs as planned."""

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

    def _active(self, spec: Optional[QuantSpec]) -> Optional[QuantSpec]:
        """`spec` as this call applies it: round-to-nearest and the deterministic Hadamard in eval
        mode, so that evaluation is deterministic and never advances the rounding streams
        (training noise does not depend on how often one evaluates)."""
        if spec is None or self.training:
            return spec
        return eval_spec(spec)

    def _quantize(self, tensor: torch.Tensor, spec: QuantSpec, signs: Optional[torch.Tensor]):
        """(fake-quantized detached tensor, in-range mask for the clipped STE or None)."""
        tensor = tensor.detach()
        if not spec.enabled:
            return tensor, None
        generator = self.streams.generator(tensor.device) if spec.stochastic else None
        with torch.no_grad():
            return quantize_with_mask(
                tensor, spec, generator, self.estimator == "clipped_ste", signs
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.high_precision == "all":
            return F.linear(input, self.weight, self.bias)
        weight_spec = self._active(self.plan.forward_weight)
        input_spec = self._active(self.plan.forward_input)
        random = next((s for s in (weight_spec, input_spec) if s.enabled and s.hadamard_random), None)
        signs = None
        if random is not None:  # one sign vector for both operands of the forward GEMM
            signs = random_signs(random.hadamard_size, self.streams.generator(input.device), input.device)
        weight_q, weight_in_range = self._quantize(self.weight, weight_spec, signs)
        if weight_spec.format.endswith("_official"):
            # The official layer's STE `q + w - w.detach()`, kept op for op: its forward value
            # is (q + w) - w; its gradient passes straight through.
            with torch.no_grad():
                weight_q = (weight_q + self.weight) - self.weight
        input_q, input_in_range = self._quantize(input, input_spec, signs)
        plan = _Backward(
            dgrad_grad_output=self._active(self.plan.dgrad_grad_output),
            dgrad_weight=self._active(self.plan.dgrad_weight),
            wgrad_grad_output=self._active(self.plan.wgrad_grad_output),
            wgrad_input=self._active(self.plan.wgrad_input),
            streams=self.streams,
            input_hadamard=input_spec.hadamard_size,
            weight_hadamard=weight_spec.hadamard_size,
            unquantized_forward=self.high_precision == "forward",
        )
        return _QuantLinearFunction.apply(
            input, self.weight, self.bias, input_q, weight_q, input_in_range, weight_in_range, plan
        )

    @torch.no_grad()
    def quantization_sqnr(self, input: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Signal-to-quantization-noise ratio in dB (0-dim device tensors, no host sync) of the weight
        and, when given, of an input, each quantized with round-to-nearest, so measuring never draws
        from the rounding streams. Keys: "weight", "activation" (for the formats that are enabled)."""
        measured = {}
        for key, tensor, spec in (("weight", self.weight, self.weight_spec), ("activation", input, self.activation_spec)):
            if tensor is None or not spec.enabled:
                continue
            signal = tensor.detach().float()
            quantized = fake_quantize(tensor.detach(), eval_spec(spec)).float()
            noise = (signal - quantized).square().sum()
            measured[key] = 10 * torch.log10(signal.square().sum() / noise.clamp_min(torch.finfo(torch.float32).tiny))
        return measured

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.plan.summary()}, estimator={self.estimator}"
