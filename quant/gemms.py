"""Per-GEMM quantization: one `QuantSpec` per operand of each of a linear layer's three GEMMs.

    forward  Y  = X W^T    reduction over in_features   operands input (X), weight (W)
    dgrad    dX = dY W     reduction over out_features  operands grad_output (dY), weight (W^T)
    wgrad    dW = dY^T X   reduction over the tokens    operands grad_output (dY^T), input (X^T)

Every operand is quantized along its GEMM's reduction dimension, so `group_size`, `block_2d`,
`hadamard_size` etc. of a slot act on that dimension (W^T's blocks run along out_features, X^T's
and dY^T's along the tokens). A slot left unset (format "inherit") takes the simple keys `quant.weight`,
`quant.activation` and `quant.gradient` (the forward and both dY slots), and the backward's W and
X slots default to reusing the forward's quantized W_q and X_q (the official code's straight-through
backward), so the simple configs mean exactly what they meant before per-GEMM specs existed.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple, Optional

from quant.spec import QuantConfigError, QuantSpec


INHERIT = "inherit"
"""The format of a slot not set under quant.gemms (see module docstring)."""


def _inherit() -> QuantSpec:
    return QuantSpec(INHERIT)


@dataclass
class ForwardGemm:
    """Y = X W^T. Inherit: quant.activation / quant.weight."""

    input: QuantSpec = field(default_factory=_inherit)
    weight: QuantSpec = field(default_factory=_inherit)


@dataclass
class DgradGemm:
    """dX = dY W. Inherit: grad_output quant.gradient; weight the forward's W_q, reused."""

    grad_output: QuantSpec = field(default_factory=_inherit)
    weight: QuantSpec = field(default_factory=_inherit)


@dataclass
class WgradGemm:
    """dW = dY^T X. Inherit: grad_output quant.gradient; input the forward's X_q, reused."""

    grad_output: QuantSpec = field(default_factory=_inherit)
    input: QuantSpec = field(default_factory=_inherit)


@dataclass
class GemmSpecs:
    """The `quant.gemms` node: explicit per-GEMM operand specs (see module docstring). Slots are
    always QuantSpec nodes (format "inherit" when unset) so that a command line can set one field,
    e.g. `quant.gemms.wgrad.input.format=nvfp4`."""

    forward: ForwardGemm = field(default_factory=ForwardGemm)
    dgrad: DgradGemm = field(default_factory=DgradGemm)
    wgrad: WgradGemm = field(default_factory=WgradGemm)

    @property
    def explicit(self) -> bool:
        return any(
            _set(getattr(gemm, slot))
            for gemm in (self.forward, self.dgrad, self.wgrad)
            for slot in gemm.__dataclass_fields__
        )


def _set(spec: Optional[QuantSpec]) -> bool:
    return spec is not None and spec.format != INHERIT


class GemmPlan(NamedTuple):
    """The six resolved operand specs of one QuantLinear. `dgrad_weight` / `wgrad_input` None:
    reuse the forward's W_q / X_q (also chosen when a 16x16-tiled W quantizes to the same W_q^T)."""

    forward_input: QuantSpec
    forward_weight: QuantSpec
    dgrad_grad_output: QuantSpec
    dgrad_weight: Optional[QuantSpec]
    wgrad_grad_output: QuantSpec
    wgrad_input: Optional[QuantSpec]

    def summary(self) -> str:
        """One short line, e.g. 'fwd X(..) W(..) | dgrad dY(..) W(=fwd) | wgrad dY(..) X(=fwd)'."""

        def show(spec: Optional[QuantSpec]) -> str:
            return "=fwd" if spec is None else spec.summary()

        return (
            f"fwd X({show(self.forward_input)}) W({show(self.forward_weight)}) | "
            f"dgrad dY({show(self.dgrad_grad_output)}) W({show(self.dgrad_weight)}) | "
            f"wgrad dY({show(self.wgrad_grad_output)}) X({show(self.wgrad_input)})"
        )


def _check(spec: Optional[QuantSpec], key: str) -> Optional[QuantSpec]:
    """The validated, resolved spec of a slot, or None when it is not set (None or inherit)."""
    if spec is not None and spec.format == INHERIT and spec != QuantSpec(INHERIT):
        raise QuantConfigError(
            f"quant {key}: fields set on an inherited slot would be ignored; set its format too"
        )
    return spec.validate(key).resolved() if _set(spec) else None


def _check_pair(gemm: str, names: tuple[str, str], a: Optional[QuantSpec], b: Optional[QuantSpec]):
    """A random Hadamard GEMM multiplies two operands rotated by one shared diag(s) H: both
    operands that are quantized in this GEMM must then rotate alike."""
    fresh = [s for s in (a, b) if s is not None and s.enabled]
    if len(fresh) == 2 and any(s.hadamard_random for s in fresh):
        if (a.hadamard_size, a.hadamard_random) != (b.hadamard_size, b.hadamard_random):
            raise QuantConfigError(
                f"quant.gemms.{gemm}: {names[0]} ({a.summary()}) and {names[1]} ({b.summary()}) "
                "must share hadamard_size and hadamard_random (one random sign vector per GEMM)"
            )


def resolve_gemms(
    weight: QuantSpec,
    activation: QuantSpec,
    gradient: QuantSpec,
    gemms: Optional[GemmSpecs] = None,
    estimator: str = "ste",
) -> GemmPlan:
    """Fill the unset slots from the simple keys, validate every slot (errors name the key)."""
    gemms = gemms or GemmSpecs()
    forward_input = _check(gemms.forward.input, "gemms.forward.input") or _check(activation, "activation")
    forward_weight = _check(gemms.forward.weight, "gemms.forward.weight") or _check(weight, "weight")
    dgrad_grad = _check(gemms.dgrad.grad_output, "gemms.dgrad.grad_output") or _check(gradient, "gradient")
    wgrad_grad = _check(gemms.wgrad.grad_output, "gemms.wgrad.grad_output") or _check(gradient, "gradient")
    dgrad_weight = _check(gemms.dgrad.weight, "gemms.dgrad.weight")
    wgrad_input = _check(gemms.wgrad.input, "gemms.wgrad.input")
    if estimator == "clipped_ste" and (forward_input.hadamard_random or forward_weight.hadamard_random):
        raise QuantConfigError(
            "quant.estimator=clipped_ste: its mask lives in the rotated basis, which a random "
            "forward Hadamard re-draws every call; use estimator=ste or hadamard_random=false"
        )
    _check_pair("forward", ("input", "weight"), forward_input, forward_weight)
    _check_pair("dgrad", ("grad_output", "weight"), dgrad_grad, dgrad_weight)
    _check_pair("wgrad", ("grad_output", "input"), wgrad_grad, wgrad_input)
    if dgrad_weight is not None and _same_as_transposed(dgrad_weight, forward_weight):
        dgrad_weight = None  # W^T quantized in 16x16 tiles is W_q^T: one quantization serves both
    return GemmPlan(forward_input, forward_weight, dgrad_grad, dgrad_weight, wgrad_grad, wgrad_input)


def _same_as_transposed(dgrad_weight: QuantSpec, forward_weight: QuantSpec) -> bool:
    """Whether quantizing W^T with `dgrad_weight` gives exactly the forward's W_q^T."""
    return (
        dgrad_weight == forward_weight
        and forward_weight.block_2d
        and not forward_weight.stochastic
        and not forward_weight.hadamard_size
    )


def eval_spec(spec: QuantSpec) -> QuantSpec:
    """`spec` in eval mode: round to nearest and the deterministic Hadamard, so evaluation is
    deterministic and never draws from the rounding streams."""
    if spec.stochastic or spec.hadamard_random:
        return replace(spec, stochastic=False, hadamard_random=False)
    return spec
