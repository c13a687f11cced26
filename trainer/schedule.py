"""Learning-rate schedules as picklable multipliers for `torch.optim.lr_scheduler.LambdaLR`.

LambdaLR checkpoints a callable object's `__dict__`, so a class (not a closure) keeps the schedule
exactly resumable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class WarmupDecay:
    """Linear warmup from 0 to 1 over `warmup_steps`, then `kind` decay to `min_ratio` at `max_steps`.

    `cosine` with min_ratio 0.1 is the papers' schedule (GaLore's `get_cosine_schedule_with_min_lr`).
    """

    kind: str
    warmup_steps: int
    max_steps: int
    min_ratio: float

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


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, max_steps: int,
                    min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(kind, warmup_steps, max_steps, min_ratio))
