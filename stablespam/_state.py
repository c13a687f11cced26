"""Helpers shared by the optimizers: the project's config error, the closure call of `step()`, state
dtypes that survive `load_state_dict`, the base class of the optimizers that step group by group.

`torch.optim.Optimizer.load_state_dict` casts every state tensor of a floating-point parameter to
the parameter's dtype: a bf16 model would silently round its fp32 running statistics (and fp32
moments) on resume, and SPAM's int64 mask indices would become floats. `restore_saved_dtypes` puts
the saved tensors back with their own dtype.
"""
from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from typing import Any

import torch


class OptimizerConfigError(ValueError):
    """An `optimizer` setting that cannot work; the message names the Hydra key (`optimizer.lr=...`)."""


def evaluate_closure(closure: Callable[[], Any] | None) -> Any:
    """`step(closure)`'s contract: re-evaluate the loss with gradients enabled, None without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def restore_saved_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """After `Optimizer.load_state_dict`, re-set the state tensors whose dtype the base class changed."""
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    for saved_id, param in zip(saved_ids, params):
        saved = state_dict["state"].get(saved_id)
        if saved is None:
            continue
        loaded = optimizer.state[param]
        for key, value in saved.items():
            if isinstance(value, torch.Tensor) and loaded[key].dtype != value.dtype:
                loaded[key] = value.to(device=param.device, copy=True)



class GroupwiseOptimizer(torch.optim.Optimizer):
    """An optimizer whose `step()` runs `_step_group(group)` for each param group, and whose
    `load_state_dict` keeps the saved state dtypes (`restore_saved_dtypes`)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restore_saved_dtypes(self, state_dict)
