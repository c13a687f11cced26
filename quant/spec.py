"""`QuantSpec`: what one operand (weights, activations or gradients) is quantized to.

A single typed dataclass serves as the Python API, the Hydra schema node and the unit of
validation, so a spec that passes `validate()` is one `fake_quantize` can run.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional


class QuantConfigError(ValueError):
    """A quantization setting that cannot work; the message names the field and the fix."""


FORMATS = ("none", "int4", "int8", "fp4", "mxfp4", "nvfp4", "int4_official", "fp4_official")
GROUPINGS = ("k", "flat")

# What a field left at None means, per format: the settings configs/quant/<format>.yaml relies
# on. The official formats default to the official code's flattened groups of 256 with the top-2
# |x| kept (no outliers for the asymmetric official weight quantizer, which has no absmax).
FORMAT_DEFAULTS = {
    "int4": {"group_size": 128},
    "int8": {"group_size": 128},
    "fp4": {"group_size": 32},
    "mxfp4": {"group_size": 32},
    "nvfp4": {"group_size": 16},
    "int4_official": {"group_size": 256, "grouping": "flat", "outlier_topk": 2},
    "fp4_official": {"group_size": 256, "grouping": "flat", "outlier_topk": 2},
}
GENERIC_DEFAULTS = {"group_size": -1, "grouping": "k", "outlier_topk": 0}
# Block sizes fixed by the format definitions (OCP MX v1.0; NVIDIA NVFP4).
FIXED_GROUP_SIZE = {"mxfp4": 32, "nvfp4": 16}
INT_BITS = {"int4": 4, "int8": 8}
E2M1_FORMATS = ("fp4", "mxfp4", "nvfp4")


@dataclass
class QuantSpec:
    """How to fake-quantize one tensor.

    Fields left at None take the format's default (FORMAT_DEFAULTS, see `resolved`), so
    `QuantSpec("fp4_official")` is the official quantizer, as `quant=fp4_official` is.

    format: one of FORMATS ("none" leaves the tensor untouched).
    group_size: elements sharing one scale; -1 = a whole row (per output channel / per
        token). Fixed at 32 for mxfp4 and 16 for nvfp4.
    symmetric: integer formats only; False = min/max with a zero point (levels 0..2^b-1).
    stochastic: stochastic rounding (unbiased) instead of round-to-nearest-even.
    grouping: "k" = groups of consecutive elements along the last (reduction) dimension;
        "flat" = groups of the flattened tensor (the official code's layout, groups may
        straddle rows).
    block_2d: 2-D tensors only: square group_size x group_size tiles (NVFP4 weight recipe, so
        W and W^T quantize alike).
    outlier_topk: per group, keep the k largest |x| unquantized and scale the rest.
    hadamard_size: 0 = off; else quantize in a basis rotated by an orthonormal block Hadamard
        transform of this size (a power of two) along the last dimension, then rotate back.
    hadamard_random: rotate each block b as (b * s) H, s a random sign vector of length
        hadamard_size (a "random Hadamard transform"), drawn from the rounding streams; the two
        operands of one GEMM share s, so their product is that of the rotated operands.
    prescale: E2M1 formats: multiply the scaled elements by this factor before rounding and
        divide after (Tseng et al.'s 3/4: with an MX scale, |x|/s < 8 becomes < 6, so stochastic
        rounding never saturates and stays unbiased).
    narrow_range: symmetric integers: levels -(2^(b-1)-1)..2^(b-1)-1 with scale absmax/qmax
        (True), or the full two's-complement range with torchao's scale absmax/(qmax+1/2).
    """

    format: str = "none"
    group_size: Optional[int] = None
    symmetric: bool = True
    stochastic: bool = False
    grouping: Optional[str] = None
    block_2d: bool = False
    outlier_topk: Optional[int] = None
    hadamard_size: int = 0
    narrow_range: bool = True
    hadamard_random: bool = False
    prescale: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.format != "none"

    def resolved(self) -> "QuantSpec":
        """This spec with every None field replaced by the format's default."""
        defaults = {**GENERIC_DEFAULTS, **FORMAT_DEFAULTS.get(self.format, {})}
        if not self.symmetric:
            defaults["outlier_topk"] = 0  # outliers are kept relative to an absmax scale
        fill = {name: value for name, value in defaults.items() if getattr(self, name) is None}
        return replace(self, **fill) if fill else self

    def validate(self, role: str = "spec") -> "QuantSpec":
        """Raise QuantConfigError with one clear message for any impossible combination."""

        def fail(message: str) -> None:
            raise QuantConfigError(f"quant {role}: {message}")

        if self.format not in FORMATS:
            fail(f"format={self.format!r} is not one of {', '.join(FORMATS)}")
        if not self.enabled:
            return self
        spec = self.resolved()
        if spec.grouping not in GROUPINGS:
            fail(f"grouping={spec.grouping!r} must be 'k' (along the reduction dim) or 'flat'")
        size = spec.group_size
        if size == 0 or size < -1:
            fail(f"group_size={size} must be a positive integer or -1 (whole row)")
        fixed = FIXED_GROUP_SIZE.get(spec.format)
        if fixed is not None and size != fixed:
            fail(f"format={spec.format} uses blocks of {fixed} by definition; got group_size={size}")
        if spec.block_2d and (spec.grouping != "k" or size == -1):
            fail("block_2d needs grouping='k' and a positive group_size")
        if spec.outlier_topk < 0:
            fail(f"outlier_topk={spec.outlier_topk} must be >= 0")
        if spec.outlier_topk and size != -1 and spec.outlier_topk >= size:
            fail(f"outlier_topk={spec.outlier_topk} must be smaller than group_size={size}")
        if spec.outlier_topk and not spec.symmetric:
            fail("outlier_topk needs a symmetric (absmax-scaled) format")
        if not spec.symmetric and spec.format not in ("int4", "int8", "int4_official"):
            fail(f"symmetric=false is only defined for integer formats, not {spec.format}")
        if spec.format == "int4_official" and not spec.symmetric and spec.stochastic:
            fail("the official INT4 weight quantizer has no stochastic rounding")
        if spec.format == "fp4_official" and spec.stochastic:
            fail("the official FP4 quantizer has no stochastic rounding; use format=fp4")
        h = spec.hadamard_size
        if h < 0 or (h and h & (h - 1)):
            fail(f"hadamard_size={h} must be 0 (off) or a power of two")
        if spec.hadamard_random and not h:
            fail("hadamard_random needs a hadamard_size (the length of the random sign vector)")
        if not 0.0 < spec.prescale <= 1.0:
            fail(f"prescale={spec.prescale} must lie in (0, 1]")
        if spec.prescale != 1.0 and spec.format not in E2M1_FORMATS:
            fail(f"prescale is defined for the E2M1 formats {E2M1_FORMATS}, not {spec.format}")
        return self

    def summary(self) -> str:
        """Short human-readable form for the run log, e.g. 'g128,sym,RTN'."""
        if not self.enabled:
            return "bf16"
        spec = self.resolved()
        size = spec.group_size
        parts = [spec.format, "row" if size == -1 else f"g{size}"]
        if spec.grouping == "flat":
            parts.append("flat")
        if spec.block_2d:
            parts.append(f"{size}x{size}")
        if spec.format in ("int4", "int8", "int4_official"):
            parts.append("sym" if spec.symmetric else "asym")
        if spec.outlier_topk:
            parts.append(f"top{spec.outlier_topk}")
        if spec.hadamard_size:
            parts.append(f"{'RH' if spec.hadamard_random else 'H'}{spec.hadamard_size}")
        if spec.prescale != 1.0:
            parts.append(f"x{spec.prescale:g}")
        parts.append("SR" if spec.stochastic else "RTN")
        return ",".join(parts)
