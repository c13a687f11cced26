"""Model converters built from the Hydra group `quant`: swap chosen nn.Linear modules in place.

The trainer applies a converter to the fp32/bf16 model before building the optimizer and before
accelerate.prepare / torch.compile, and checkpoints `converter.state_dict()` (the stochastic
rounding streams) with the rest of the run state.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from omegaconf import OmegaConf
from torch import nn

from quant.gemms import GemmSpecs, resolve_gemms
from quant.layer import ESTIMATORS, QuantLinear, RoundingStreams
from quant.spec import QuantConfigError, QuantSpec

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("none", "fake", "fp8")
BF16_LAST_SCOPES = ("forward", "all")
FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
_BLOCK_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class QuantConfig:
    """Schema of the `quant` group.

    method: "none" (nothing converted), "fake" (simulated formats via QuantLinear) or "fp8"
        (real FP8 GEMMs through torchao; CUDA sm_89+ only).
    target_modules: leaf names of the nn.Linear modules to convert.
    exclude_modules: fnmatch patterns on full module names to leave in high precision.
    keep_first_blocks / keep_last_blocks: decoder blocks (`layers.N.`) left in high precision.
    gemms: explicit per-GEMM operand specs (quant.gemms, see quant.gemms); its unset slots take
        weight / activation / gradient, so the simple keys remain the common case.
    keep_last_fraction: also keep the last round(fraction x blocks) decoder blocks in high
        precision (NVIDIA's NVFP4 recipe: about 15%), whatever the model's depth.
    bf16_last_fraction: precision policy: the last fraction of the run's steps run converted
        linears in high precision (NVIDIA's recovery phase); a function of (step, max_steps)
        only, so a resumed run switches at the same step.
    bf16_last_scope: what that phase switches: "forward" (the NVFP4 paper's choice: the forward
        GEMM runs on unquantized X and W, the backward GEMMs keep their quantized operands) or
        "all" (forward and backward unquantized, a plain nn.Linear).
    """

    name: str = "none"
    method: str = "none"
    weight: QuantSpec = field(default_factory=QuantSpec)
    activation: QuantSpec = field(default_factory=QuantSpec)
    gradient: QuantSpec = field(default_factory=QuantSpec)
    estimator: str = "ste"
    target_modules: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    exclude_modules: list[str] = field(default_factory=list)
    keep_first_blocks: int = 0
    keep_last_blocks: int = 0
    fp8_recipe: str = "tensorwise"
    gemms: GemmSpecs = field(default_factory=GemmSpecs)
    keep_last_fraction: float = 0.0
    bf16_last_fraction: float = 0.0
    bf16_last_scope: str = "forward"

    def validate(self) -> "QuantConfig":
        if self.method not in METHODS:
            raise QuantConfigError(f"quant.method={self.method!r} must be one of {METHODS}")
        if self.estimator not in ESTIMATORS:
            raise QuantConfigError(f"quant.estimator={self.estimator!r} must be one of {ESTIMATORS}")
        if self.keep_first_blocks < 0 or self.keep_last_blocks < 0:
            raise QuantConfigError("quant.keep_first_blocks / keep_last_blocks must be >= 0")
        if self.method == "fp8" and self.fp8_recipe not in FP8_RECIPES:
            raise QuantConfigError(f"quant.fp8_recipe={self.fp8_recipe!r} must be one of {FP8_RECIPES}")
        for key in ("keep_last_fraction", "bf16_last_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise QuantConfigError(f"quant.{key}={value} must lie in [0, 1)")
        if self.bf16_last_scope not in BF16_LAST_SCOPES:
            raise QuantConfigError(
                f"quant.bf16_last_scope={self.bf16_last_scope!r} must be one of {', '.join(BF16_LAST_SCOPES)}"
            )
        if self.method != "fake" and (self.gemms.explicit or self.bf16_last_fraction):
            raise QuantConfigError(
                f"quant.gemms / quant.bf16_last_fraction need method=fake, not {self.method!r}"
            )
        if self.method == "fake":
            resolve_gemms(self.weight, self.activation, self.gradient, self.gemms, self.estimator)
        return self

    def high_precision_from(self, max_steps: int) -> int:
        """The first step of the bf16 phase (max_steps when there is none)."""
        return max_steps - math.floor(self.bf16_last_fraction * max_steps)


class ModelConverter(Protocol):
    def convert(self, model: nn.Module) -> nn.Module: ...

    def describe(self) -> str: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def seed(self, seed: int, rank: int = 0) -> None: ...

    def set_step(self, step: int, max_steps: int) -> None: ...


def select_linears(model: nn.Module, cfg: QuantConfig) -> tuple[list[str], int]:
    """Names of the nn.Linear modules to convert, and the model's total nn.Linear count."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    blocks = sorted({int(m.group(1)) for n in linears if (m := _BLOCK_INDEX.search(n))})
    kept_blocks = set(blocks[: cfg.keep_first_blocks])
    last = max(cfg.keep_last_blocks, math.floor(cfg.keep_last_fraction * len(blocks) + 0.5))
    if last:
        kept_blocks |= set(blocks[-last:])
    chosen = []
    for name in linears:
        if name.rsplit(".", 1)[-1] not in cfg.target_modules:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in cfg.exclude_modules):
            continue
        block = _BLOCK_INDEX.search(name)
        if block and int(block.group(1)) in kept_blocks:
            continue
        chosen.append(name)
    return chosen, len(linears)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class _WithoutRoundingState:
    """Converters that draw no random numbers: nothing to seed or checkpoint."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def seed(self, seed: int, rank: int = 0) -> None:
        return None

    def set_step(self, step: int, max_steps: int) -> None:
        return None


class NoQuantConverter(_WithoutRoundingState):
    """quant=none: converts nothing."""

    def __init__(self, cfg: QuantConfig) -> None:
        self.cfg = cfg

    def convert(self, model: nn.Module) -> nn.Module:
        return model

    def describe(self) -> str:
        return "none: all linears in high precision"


class FakeQuantConverter:
    """Swaps the selected linears for QuantLinear, all sharing one set of rounding streams."""

    def __init__(self, cfg: QuantConfig) -> None:
        self.cfg = cfg
        self.streams = RoundingStreams()
        self.converted: list[str] = []
        self.layers: list[QuantLinear] = []
        self.total_linears = 0
        self.high_precision: str | None = None

    def convert(self, model: nn.Module) -> nn.Module:
        names, self.total_linears = select_linears(model, self.cfg)
        self.layers = []
        for name in names:
            layer = QuantLinear.from_linear(
                model.get_submodule(name),
                weight_spec=self.cfg.weight,
                activation_spec=self.cfg.activation,
                gradient_spec=self.cfg.gradient,
                gemms=self.cfg.gemms,
                estimator=self.cfg.estimator,
                streams=self.streams,
            )
            _swap(model, name, layer)
            self.layers.append(layer)
        self.converted = names
        return model

    def set_step(self, step: int, max_steps: int) -> None:
        """Apply the precision policy before training step `step` (0-based) of `max_steps`."""
        high = self.cfg.bf16_last_scope if step >= self.cfg.high_precision_from(max_steps) else None
        if high != self.high_precision:
            self.high_precision = high
            for layer in self.layers:
                layer.high_precision = high

    def describe(self) -> str:
        cfg = self.cfg
        if cfg.gemms.explicit:
            parts = [f"{cfg.name} {self.layers[0].plan.summary()}" if self.layers else cfg.name]
        else:
            parts = [f"{cfg.name} W({cfg.weight.summary()}) A({cfg.activation.summary()})"]
            if cfg.gradient.enabled:
                parts.append(f"G({cfg.gradient.summary()})")
        parts.append(cfg.estimator)
        parts.append(f"on {len(self.converted)}/{self.total_linears} linears")
        if cfg.bf16_last_fraction:
            passes = "forward" if cfg.bf16_last_scope == "forward" else "forward and backward"
            parts.append(f"| bf16 {passes} for the last {cfg.bf16_last_fraction:.0%} of steps")
        return " ".join(parts)

    def state_dict(self) -> dict:
        return {"rounding_streams": self.streams.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.streams.load_state_dict(state["rounding_streams"])

    def seed(self, seed: int, rank: int = 0) -> None:
        self.streams.seed(seed, rank)


class Float8Converter(_WithoutRoundingState):
    """Real FP8 GEMMs via torchao `convert_to_float8_training` (needs FP8 tensor cores)."""

    def __init__(self, cfg: QuantConfig) -> None:
        self.cfg = cfg
        self.converted: list[str] = []
        self.total_linears = 0

    def convert(self, model: nn.Module) -> nn.Module:
        _require_fp8_gpu()
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        names, self.total_linears = select_linears(model, self.cfg)
        # torchao's FP8 GEMM (torch._scaled_mm) needs both dimensions divisible by 16.
        chosen = {
            n for n in names
            if model.get_submodule(n).in_features % 16 == 0
            and model.get_submodule(n).out_features % 16 == 0
        }
        convert_to_float8_training(
            model,
            config=Float8LinearConfig.from_recipe_name(self.cfg.fp8_recipe),
            module_filter_fn=lambda module, fqn: fqn in chosen,
        )
        self.converted = sorted(chosen)
        return model

    def describe(self) -> str:
        return (
            f"fp8 torchao {self.cfg.fp8_recipe} on {len(self.converted)}/{self.total_linears} linears"
        )


class Fp8UnavailableError(QuantConfigError):
    """quant=fp8 on a machine without FP8 tensor cores."""


def _require_fp8_gpu() -> None:
    if not torch.cuda.is_available():
        raise Fp8UnavailableError(
            "quant=fp8 needs a CUDA GPU with FP8 tensor cores (sm_89+); this run is on CPU. "
            "Use quant=int8 / quant=int4 / quant=mxfp4 / quant=nvfp4 (simulated) instead."
        )
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise Fp8UnavailableError(
            f"quant=fp8 needs a CUDA GPU with FP8 tensor cores (sm_89+); this GPU is "
            f"sm_{major}{minor}. Use quant=int8 / quant=int4 / quant=mxfp4 / quant=nvfp4 "
            "(simulated) instead."
        )


def to_quant_config(cfg: Any) -> QuantConfig:
    """Accept a QuantConfig, a composed DictConfig node or a plain dict; validate types."""
    if isinstance(cfg, QuantConfig):
        return cfg.validate()
    try:
        merged = OmegaConf.merge(OmegaConf.structured(QuantConfig), cfg)
    except Exception as error:  # OmegaConf raises several types for a bad key or value
        raise QuantConfigError(f"quant config: {error}") from error
    return OmegaConf.to_object(merged).validate()


def build_converter(cfg: Any) -> ModelConverter:
    """The converter for a composed `quant` node (or QuantConfig / dict)."""
    config = to_quant_config(cfg)
    if config.method == "none":
        return NoQuantConverter(config)
    if config.method == "fp8":
        return Float8Converter(config)
    return FakeQuantConverter(config)
