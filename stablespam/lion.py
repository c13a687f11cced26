"""Lion (arXiv 2302.06675) with lion-pytorch 0.2.x semantics, as multi-tensor ops.

Our own (a few lines) rather than a dependency on lion-pytorch: that package's eager path is a
per-tensor loop and it is a dev-only dependency here; tests pin this class to it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from stablespam._state import evaluate_closure


class Lion(torch.optim.Optimizer):
    """p *= 1 - lr*wd; p -= lr * sign(beta1 m + (1-beta1) g); m = beta2 m + (1-beta2) g."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        if lr < 0 or weight_decay < 0 or not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"invalid Lion hyperparameters lr={lr} betas={betas} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            if wd != 0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            update = torch._foreach_mul(exp_avgs, beta1)
            torch._foreach_add_(update, grads, alpha=1.0 - beta1)
            torch._foreach_sign_(update)
            torch._foreach_add_(params, update, alpha=-lr)
            torch._foreach_mul_(exp_avgs, beta2)
            torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta2)
        return loss
