"""Simulated low-precision training: INT4/INT8, FP4 (E2M1), MXFP4, NVFP4, the official
Stable-SPAM formats, per-GEMM specs for quantized backward passes (the FP4 recipes), and real
FP8 through torchao. See docs/quantization.md."""
from quant.converter import (
    PROJECTIONS,
    Float8Converter,
    Fp8UnavailableError,
    FakeQuantConverter,
    ModelConverter,
    NoQuantConverter,
    QuantConfig,
    build_converter,
    select_linears,
)
from quant.functional import fake_quantize, hadamard_rotate, quantize_with_mask
from quant.gemms import DgradGemm, ForwardGemm, GemmPlan, GemmSpecs, WgradGemm, resolve_gemms
from quant.layer import QuantLinear, RoundingStreams
from quant.spec import FORMATS, QuantConfigError, QuantSpec


def register_configs(cs) -> None:
    """Store the `quant` group schema (`quant_schema`) in Hydra's ConfigStore."""
    cs.store(group="quant", name="quant_schema", node=QuantConfig)


__all__ = [
    "FORMATS",
    "DgradGemm",
    "ForwardGemm",
    "GemmPlan",
    "GemmSpecs",
    "WgradGemm",
    "resolve_gemms",
    "PROJECTIONS",
    "FakeQuantConverter",
    "Float8Converter",
    "Fp8UnavailableError",
    "ModelConverter",
    "NoQuantConverter",
    "QuantConfig",
    "QuantConfigError",
    "QuantLinear",
    "QuantSpec",
    "RoundingStreams",
    "build_converter",
    "fake_quantize",
    "hadamard_rotate",
    "quantize_with_mask",
    "register_configs",
    "select_linears",
]
