"""The learning-rate schedule as a pure function of (step, config), as in OLMo-core.

No scheduler object is checkpointed: the LR of every step is recomputed from the composed config,
so a resumed run with a new `trainer.max_steps`, `warmup_steps`, `min_lr_ratio` or `optimizer.lr`
follows the new schedule from the step it resumes at.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class WarmupDecay:
    """Linear warmup from 0 to 1 over `warmup_steps`, then `kind` decay to `min_ratio` at `max_steps`.

    `cosine` with min_ratio 0.1 is the papers' schedule (GaLore's `get_cosine_schedule_with_min_lr`).
    `step` counts the optimizer steps already taken, so the first step uses `self(0)`.
    """

    kind: str
    warmup_steps: int
    max_steps: int
    min_ratio: float

    @classmethod
    def from_config(cls, trainer_cfg: Any) -> "WarmupDecay":
        return cls(trainer_cfg.lr_schedule, trainer_cfg.warmup_steps, trainer_cfg.max_steps, trainer_cfg.min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        if self.kind == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * decay


def set_learning_rates(optimizer: torch.optim.Optimizer, base_lrs: list[float | None], multiplier: float) -> float | None:
    """Set each group's LR to its base LR (from the config) times `multiplier`; returns the first.

    A base LR of None (Adafactor's relative step) leaves the group alone.
    """
    for group, base in zip(optimizer.param_groups, base_lrs):
        if base is not None:
            group["lr"] = base * multiplier
    return optimizer.param_groups[0]["lr"]
