"""Typed Hydra schemas for the `optimizer` group and `build_optimizer`, the trainer's entry point.

Each schema has `name` (the preset / variant, e.g. "stable_spam_4bit") and `kind` (which optimizer
class builds it). Baselines also carry the composable stabilizer switches (adaclip, adagn,
moret_interval, spike_clip), so Table 3/4 compositions are yaml presets. Every schema carries
`gradient_stabilizer` (GradientStabilizer's norm rescaling in front of any optimizer, `gs_*`).

`total_steps` of StableSPAM (the official total_T, beta1/gamma1 cosine): null = no cosine, a
positive number = that many steps, -1 = the trainer's max_steps (passed to build_optimizer).

Parameter groups: tensors with fewer than 2 dims (norms, biases) and embeddings get no decay (their
own group, also when weight_decay is 0, so that the group layout of a checkpoint does not depend on
a hyperparameter); SPAM's `density` applies only to the attention/MLP projection weights (official
trainer); Adam-mini partitions by module role from the parameter names. Every group holds the
config's learning rate under `base_lr` (the trainer's schedule multiplies it into `lr`).

`state_bits` (adam, adamw, spam, stable_spam): 32 = float moments as before, 8 or 4 = block-wise
quantized moments (quantized_state.py); adam/adamw then build `LowBitAdam` instead of torch's class.

`build_optimizer` checks every value first and raises `OptimizerConfigError` naming the Hydra key.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from stablespam._state import OptimizerConfigError
from stablespam.adafactor import Adafactor
from stablespam.adam_mini import AdamMini
from stablespam.lion import Lion
from stablespam.low_bit_adam import LowBitAdam
from stablespam.quantized_state import STATE_BITS
from stablespam.sharding import is_sharded
from stablespam.spam import SPAM
from stablespam.stabilizers import AdaClip, AdaGN, GradientStabilizer, GSNorm, MoRet, SpikeClip, Stabilized
from stablespam.stable_spam import MODES, StableSPAM

# Paper Tables 6 (4-bit) and 7 (BF16) learning rates of Stable-SPAM; pick with optimizer.lr=...
PAPER_LEARNING_RATES: dict[str, dict[str, float]] = {
    "stable_spam_4bit": {"llama_130m": 1e-3, "llama_350m": 4e-4, "llama_1b": 2e-4},
    "stable_spam_bf16": {"llama_60m": 1e-3, "llama_130m": 8e-4, "llama_350m": 4e-4, "llama_1b": 2e-4},
}

_PROJECTION = re.compile(r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


@dataclass
class GradientStabilizerFields:
    """GradientStabilizer in front of any optimizer (off by default); the paper's defaults."""

    gradient_stabilizer: bool = False
    gs_gamma1: float = 0.6
    gs_gamma2: float = 0.999
    gs_eps: float = 1e-12
    gs_bias_correction: bool = True


@dataclass
class StabilizerFields(GradientStabilizerFields):
    """AdaClip / AdaGN / SpikeClip / MoRet in front of a baseline (all off by default)."""

    adaclip: bool = False
    adagn: bool = False
    spike_clip: bool = False
    moret_interval: int = 0
    gamma1: float = 0.7
    gamma2: float = 0.9
    gamma3: float = 0.999
    spike_threshold: float = 5000.0
    spike_delay: int = 20
    stabilizer_eps: float = 1e-8


@dataclass
class AdamConfig(StabilizerFields):
    name: str = "adam"
    kind: str = "adam"  # "adam" (torch.optim.Adam) or "adamw" (torch.optim.AdamW)
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    state_bits: int = 32  # 32 = torch's Adam/AdamW; 8 or 4 = LowBitAdam with block-wise quantized moments


@dataclass
class LionConfig(StabilizerFields):
    name: str = "lion"
    kind: str = "lion"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0


@dataclass
class AdamMiniConfig(StabilizerFields):
    name: str = "adam_mini"
    kind: str = "adam_mini"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class AdafactorConfig(StabilizerFields):
    name: str = "adafactor"
    kind: str = "adafactor"
    lr: float | None = 1e-3
    beta1: float | None = 0.9
    eps: list[float] = field(default_factory=lambda: [1e-30, 1e-3])
    clip_threshold: float = 1.0
    decay_rate: float = -0.8
    weight_decay: float = 0.0
    relative_step: bool = False
    scale_parameter: bool = False
    warmup_init: bool = False


@dataclass
class SPAMConfig(GradientStabilizerFields):
    name: str = "spam"
    kind: str = "spam"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    weight_decay: float = 0.0
    density: float = 1.0
    threshold: float = 5000.0
    reset_interval: int = 500
    warmup_steps: int = 150
    clip_delay: int = 20
    mask_seed: int = 0
    state_bits: int = 32


@dataclass
class StableSPAMConfig(GradientStabilizerFields):
    name: str = "stable_spam"
    kind: str = "stable_spam"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    gamma1: float = 0.7
    gamma2: float = 0.9
    gamma3: float = 0.999
    reset_interval: int = 1000
    total_steps: int | None = None
    eta_min: float = 0.5
    mode: str = "official"
    fp32_moments: bool = False
    compile: bool = False
    state_bits: int = 32


SCHEMAS: dict[str, type] = {
    "adam_schema": AdamConfig,
    "lion_schema": LionConfig,
    "adam_mini_schema": AdamMiniConfig,
    "adafactor_schema": AdafactorConfig,
    "spam_schema": SPAMConfig,
    "stable_spam_schema": StableSPAMConfig,
}


def register_configs(cs: ConfigStore) -> None:
    """Store the optimizer schemas in group `optimizer` (yaml files list `<kind>_schema` first)."""
    for schema_name, schema in SCHEMAS.items():
        cs.store(group="optimizer", name=schema_name, node=schema)


def _as_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if is_dataclass(cfg):
        return asdict(cfg)
    return dict(cfg)


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def _on_cuda(model: torch.nn.Module) -> bool:
    return all(p.is_cuda for p in model.parameters())


def _stabilize(base: torch.optim.Optimizer, c: dict[str, Any]) -> torch.optim.Optimizer:
    """`base` behind the switched-on transforms; GradientStabilizer first, on the raw gradient.

    SPAM's and StableSPAM's schemas only have the gradient_stabilizer switch (the others are theirs).
    """
    gs_args = (c["gs_gamma1"], c["gs_gamma2"], c["gs_eps"], c["gs_bias_correction"])
    transforms: list[Any] = [GSNorm(*gs_args)] if c["gradient_stabilizer"] else []
    if c.get("spike_clip"):
        transforms.append(SpikeClip(c["spike_threshold"], c["spike_delay"]))
    if c.get("adaclip"):
        transforms.append(AdaClip(c["gamma3"]))
    if c.get("adagn"):
        transforms.append(AdaGN(c["gamma1"], c["gamma2"], c["stabilizer_eps"]))
    moret = MoRet(c["moret_interval"]) if c.get("moret_interval", 0) > 0 else None
    if not transforms and moret is None:
        return base
    if c["gradient_stabilizer"] and len(transforms) == 1 and moret is None:
        return GradientStabilizer(base, *gs_args)
    return Stabilized(base, transforms, moret)


def _unit(v: float) -> bool:
    return 0.0 <= v < 1.0


def _nonnegative(v: float) -> bool:
    return v >= 0


# key -> (test of a valid value, what the message says); a key is checked wherever a schema has it
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (_nonnegative, "must be >= 0"),
    "betas": (lambda v: len(v) == 2 and all(_unit(b) for b in v), "must be two values in [0, 1)"),
    "eps": (lambda v: all(e >= 0 for e in v) if isinstance(v, list) else v >= 0, "must be >= 0"),
    "weight_decay": (_nonnegative, "must be >= 0"),
    "reset_interval": (_nonnegative, "must be >= 0 (0 = never)"),
    "moret_interval": (_nonnegative, "must be >= 0 (0 = off)"),
    "warmup_steps": (_nonnegative, "must be >= 0"),
    "clip_delay": (_nonnegative, "must be >= 0"),
    "spike_delay": (_nonnegative, "must be >= 0"),
    "gamma1": (_unit, "must lie in [0, 1)"),
    "gamma2": (_unit, "must lie in [0, 1)"),
    "gamma3": (_unit, "must lie in [0, 1)"),
    "threshold": (_nonnegative, "must be >= 0 (0 = no spike clipping)"),
    "spike_threshold": (_nonnegative, "must be >= 0 (0 = no spike clipping)"),
    "clip_threshold": (lambda v: v > 0, "must be > 0"),
    "stabilizer_eps": (_nonnegative, "must be >= 0"),
    "gs_gamma1": (_unit, "must lie in [0, 1)"),
    "gs_gamma2": (_unit, "must lie in [0, 1)"),
    "gs_eps": (_nonnegative, "must be >= 0"),
    "density": (lambda v: 0.0 < v <= 1.0, "must lie in (0, 1]"),
    "eta_min": (lambda v: 0.0 <= v <= 1.0, "must lie in [0, 1]"),
    "total_steps": (lambda v: v is None or v == -1 or v >= 1, "must be null, -1 (= trainer.max_steps) or >= 1"),
    "beta1": (lambda v: v is None or _unit(v), "must be null or lie in [0, 1)"),
    "decay_rate": (lambda v: v <= 0, "must be <= 0 (Adafactor's beta2 = 1 - step^decay_rate)"),
    "mode": (lambda v: v in MODES, f"must be one of {', '.join(MODES)}"),
    "state_bits": (lambda v: v in STATE_BITS, f"must be one of {', '.join(map(str, STATE_BITS))}"),
}


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value).replace(" ", "")


def _fail(key: str, value: Any, rule: str) -> OptimizerConfigError:
    return OptimizerConfigError(f"optimizer.{key}={_show(value)} {rule}")


def validate_config(cfg: Any) -> None:
    """Raise `OptimizerConfigError` naming the first invalid value of an `optimizer` node."""
    c = _as_dict(cfg)
    kind = c.get("kind")
    if kind not in BUILDERS:
        raise _fail("kind", kind, f"must be one of {', '.join(BUILDERS)}")
    if kind == "adafactor":
        if c["relative_step"] and c["lr"] is not None:
            raise _fail("lr", c["lr"], "must be null with optimizer.relative_step=true (Adafactor sets its own step size)")
        if not c["relative_step"] and c["lr"] is None:
            raise _fail("lr", None, "needs optimizer.relative_step=true")
        if c["warmup_init"] and not c["relative_step"]:
            raise _fail("warmup_init", True, "needs optimizer.relative_step=true")
    for key, value in c.items():
        if key not in _RULES or (key == "lr" and value is None and kind == "adafactor"):
            continue
        if kind == "stable_spam" and key == "gamma1" and value == -1:  # "use beta1"
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise _fail(key, value, "must be a finite number")
        valid, rule = _RULES[key]
        if not valid(value):
            raise _fail(key, value, rule)
    if c.get("compile") and c.get("state_bits", 32) != 32:
        raise _fail("compile", True, "needs optimizer.state_bits=32 (quantized moments are updated eagerly)")


def refuse_on_shards(c: dict[str, Any]) -> None:
    """The settings that cannot follow the unsharded run on FSDP2 shards, refused with the key named."""
    if c.get("state_bits", 32) != 32:
        raise _fail("state_bits", c["state_bits"], "cannot run with trainer.parallelism=fsdp2: the block-wise "
                    "quantized moments' blocks would straddle the parameter shards; use optimizer.state_bits=32")
    if c.get("compile"):
        raise _fail("compile", True, "cannot run with trainer.parallelism=fsdp2 (the sharded step all-reduces "
                    "its statistics eagerly); set optimizer.compile=false")


def build_optimizer(model: torch.nn.Module, cfg: Any, total_steps: int) -> torch.optim.Optimizer:
    """The optimizer described by the composed `optimizer` node `cfg` for `model`'s parameters.

    Raises `OptimizerConfigError` for an invalid value. Every param group gets `base_lr`, the
    config's learning rate (None for Adafactor with relative_step).
    """
    validate_config(cfg)
    c = _as_dict(cfg)
    if any(is_sharded(p) for p in model.parameters()):
        refuse_on_shards(c)
    optimizer = BUILDERS[c["kind"]](model, c, total_steps)
    for group in optimizer.param_groups:
        group["base_lr"] = c["lr"]
    return optimizer


def _adam(model: torch.nn.Module, c: dict[str, Any], total_steps: int) -> torch.optim.Optimizer:
    if c["state_bits"] != 32:
        base = LowBitAdam(_decay_groups(model, c["weight_decay"]), lr=c["lr"], betas=tuple(c["betas"]),
                          eps=c["eps"], weight_decay=c["weight_decay"],
                          decoupled_weight_decay=c["kind"] == "adamw", state_bits=c["state_bits"])
        return _stabilize(base, c)
    cls = torch.optim.Adam if c["kind"] == "adam" else torch.optim.AdamW
    fast = {"fused": True} if _on_cuda(model) else {"foreach": True}
    base = cls(_decay_groups(model, c["weight_decay"]), lr=c["lr"], betas=tuple(c["betas"]),
               eps=c["eps"], weight_decay=c["weight_decay"], **fast)
    return _stabilize(base, c)


def _lion(model: torch.nn.Module, c: dict[str, Any], total_steps: int) -> torch.optim.Optimizer:
    base = Lion(_decay_groups(model, c["weight_decay"]), lr=c["lr"], betas=tuple(c["betas"]),
                weight_decay=c["weight_decay"])
    return _stabilize(base, c)


def _adam_mini(model: torch.nn.Module, c: dict[str, Any], total_steps: int) -> torch.optim.Optimizer:
    hf = model.config  # type: ignore[attr-defined]
    base = AdamMini(model.named_parameters(), lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"],
                    weight_decay=c["weight_decay"], dim=hf.hidden_size, n_heads=hf.num_attention_heads,
                    n_kv_heads=getattr(hf, "num_key_value_heads", None))
    return _stabilize(base, c)


def _adafactor(model: torch.nn.Module, c: dict[str, Any], total_steps: int) -> torch.optim.Optimizer:
    base = Adafactor(_decay_groups(model, c["weight_decay"]), lr=c["lr"], eps=tuple(c["eps"]),
                     clip_threshold=c["clip_threshold"], decay_rate=c["decay_rate"], beta1=c["beta1"],
                     weight_decay=c["weight_decay"], relative_step=c["relative_step"],
                     scale_parameter=c["scale_parameter"], warmup_init=c["warmup_init"])
    return _stabilize(base, c)


def _spam(model: torch.nn.Module, c: dict[str, Any], total_steps: int) -> torch.optim.Optimizer:
    dense, sparse = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (sparse if _PROJECTION.search(name) and p.dim() == 2 else dense).append(p)
    groups = [{"params": sparse, "density": c["density"]}, {"params": dense, "density": 1.0}]
    base = SPAM([g for g in groups if g["params"]], lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"],
                weight_decay=c["weight_decay"], threshold=c["threshold"], reset_interval=c["reset_interval"],
                warmup_steps=c["warmup_steps"], clip_delay=c["clip_delay"], mask_seed=c["mask_seed"],
                state_bits=c["state_bits"])
    return _stabilize(base, c)


def _stable_spam(model: torch.nn.Module, c: dict[str, Any], total_steps: int) -> torch.optim.Optimizer:
    total = c["total_steps"]
    if total is not None and total < 0:
        total = total_steps
    base = StableSPAM(_decay_groups(model, c["weight_decay"]), lr=c["lr"], betas=tuple(c["betas"]),
                      eps=c["eps"], weight_decay=c["weight_decay"], gamma1=c["gamma1"], gamma2=c["gamma2"],
                      gamma3=c["gamma3"], reset_interval=c["reset_interval"], total_steps=total,
                      eta_min=c["eta_min"], mode=c["mode"], fp32_moments=c["fp32_moments"],
                      compile=c["compile"], state_bits=c["state_bits"])
    return _stabilize(base, c)


BUILDERS: dict[str, Callable[[torch.nn.Module, dict[str, Any], int], torch.optim.Optimizer]] = {
    "adam": _adam,
    "adamw": _adam,
    "lion": _lion,
    "adam_mini": _adam_mini,
    "adafactor": _adafactor,
    "spam": _spam,
    "stable_spam": _stable_spam,
}
