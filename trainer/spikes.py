"""Opt-in loss/gradient-norm spike skipping (`trainer.spike_policy=skip`), after OLMo-core.

A step is a spike when its loss or its gradient norm lies more than `z` standard deviations above
the mean of the last `window` accepted steps. The statistics live in a ring buffer on the device
and the decision is a device tensor; only accepted steps enter the buffer, so a burst of spikes
cannot raise its own threshold. Until the buffer holds `window` steps nothing is a spike.

Applying a skip needs no host read either: the optimizer step is gated on the decision on the
device (`stablespam.gating`), and `accept` records a step only where its update was taken. A skipped
step still uses up its batch and its LR-schedule position (as in OLMo-core); the loop counts skips
on the device and logs them on logging steps. With the policy off (the default) nothing here runs.
"""
from __future__ import annotations

from typing import Any

import torch


class SpikeDetector:
    def __init__(self, window: int, z: float, device: torch.device) -> None:
        self.window, self.z = window, z
        self.history = torch.zeros(2, window, dtype=torch.float64, device=device)  # rows: loss, grad norm
        self.seen = torch.zeros((), dtype=torch.int64, device=device)

    def is_spike(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Device bool: this step's loss or grad norm is a spike against the accepted history."""
        values = torch.stack([loss.double(), grad_norm.double()])
        mean = self.history.mean(dim=1)
        std = self.history.std(dim=1)
        above = (values - mean) > self.z * std
        return (self.seen >= self.window) & above.any() & torch.isfinite(values).all()

    def accept(self, loss: torch.Tensor, grad_norm: torch.Tensor, taken: torch.Tensor | None = None) -> None:
        """Record a step whose update was taken (`taken`, a device bool; None: taken), device ops only."""
        slot = self.seen % self.window
        values = torch.stack([loss.double(), grad_norm.double()]).reshape(2, 1)
        if taken is not None:  # a skipped step writes its slot's old values back and does not count
            values = torch.where(taken, values, self.history.index_select(1, slot.reshape(1)))
        self.history.index_copy_(1, slot.reshape(1), values)
        self.seen += 1 if taken is None else taken

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.cpu(), "seen": self.seen.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["history"].shape != self.history.shape:
            self.history.zero_()
            self.seen.zero_()  # another window: gather the statistics afresh
            return
        self.history.copy_(state["history"])
        self.seen.copy_(state["seen"])
