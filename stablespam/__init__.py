"""Optimizer zoo: Stable-SPAM, SPAM and the papers' baselines, with composable stabilizers and
GradientStabilizer.

`build_optimizer(model, cfg, total_steps)` builds any of them from a Hydra `optimizer` node (invalid
values raise `OptimizerConfigError`); `register_configs(cs)` stores the typed schemas of that group;
`load_state_keeping_hyperparameters(optimizer, state_dict)` resumes state and counters under the
current config's hyperparameters. `state_bits=8|4` (adam, adamw, spam, stable_spam) keeps Adam's
moments as block-wise quantized codes (quantized_state.py, LowBitAdam).
"""
from stablespam._state import OptimizerConfigError
from stablespam.adafactor import Adafactor
from stablespam.adam_mini import AdamMini
from stablespam.factory import (
    PAPER_LEARNING_RATES,
    AdafactorConfig,
    AdamConfig,
    AdamMiniConfig,
    LionConfig,
    SPAMConfig,
    StableSPAMConfig,
    build_optimizer,
    register_configs,
    validate_config,
)
from stablespam.lion import Lion
from stablespam.low_bit_adam import LowBitAdam
from stablespam.resume import GROUP_STATE_KEYS, load_state_keeping_hyperparameters
from stablespam.spam import SPAM
from stablespam.stabilizers import AdaClip, AdaGN, GradientStabilizer, GSNorm, MoRet, SpikeClip, Stabilized
from stablespam.stable_spam import StableSPAM
from stablespam.transforms import TransformStats, recording

__all__ = [
    "GROUP_STATE_KEYS",
    "PAPER_LEARNING_RATES",
    "AdaClip",
    "AdaGN",
    "Adafactor",
    "AdafactorConfig",
    "AdamConfig",
    "AdamMini",
    "AdamMiniConfig",
    "GSNorm",
    "GradientStabilizer",
    "Lion",
    "LionConfig",
    "LowBitAdam",
    "MoRet",
    "OptimizerConfigError",
    "SPAM",
    "SPAMConfig",
    "SpikeClip",
    "Stabilized",
    "StableSPAM",
    "StableSPAMConfig",
    "TransformStats",
    "build_optimizer",
    "load_state_keeping_hyperparameters",
    "recording",
    "register_configs",
    "validate_config",
]
