"""Adafactor with the Hugging Face semantics the papers used (transformers' implementation).

We subclass `transformers.optimization.Adafactor` (the library does the job; torch.optim.Adafactor
cannot turn off relative steps or parameter scaling and has no beta1) to refuse a negative
learning rate (the library accepts it and climbs the loss), to keep its fp32 state fp32 across
`load_state_dict` for bf16 parameters (the base class would down-cast it), and to step sharded
(FSDP2) parameters: the library's step on a shard would take the column means, the mean of the row
moments and both RMS values over the shard only. The sharded step is the library's op for op on the
local rows, with those whole-tensor sums completed in two all-reduces per param group.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from transformers.optimization import Adafactor as HFAdafactor

from stablespam._state import evaluate_closure, restore_saved_dtypes
from stablespam.sharding import all_reduce_sum_, is_sharded, local, shard_group, sharded_like


class Adafactor(HFAdafactor):
    """`transformers.optimization.Adafactor` refusing lr < 0, with a state_dict round trip that keeps fp32 state."""

    def __init__(self, params: Any, lr: float | None = None, *args: Any, **kwargs: Any) -> None:
        if lr is not None and lr < 0:
            raise ValueError(f"lr must be >= 0 (or None with relative_step), got {lr}")
        super().__init__(params, lr, *args, **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if not any(is_sharded(p) for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._sharded_step(group, params)
        return loss

    def _sharded_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """The library's step for dim-0 shards: rows are whole on each rank, so the row moments are
        local (a DTensor sharded like the rows); the column moments (replicated), the mean of the row
        moments, RMS(p) and RMS(update) need the whole tensor's sums."""
        process_group = shard_group(params)
        grads, updates, sums = [], [], []
        for p in params:
            if p.dim() > 2:
                raise NotImplementedError("sharded Adafactor steps tensors of at most 2 dims")
            grad = local(p.grad)
            grad = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
            state = self.state[p]
            factored, use_first_moment = self._get_options(group, p.shape)
            if not state:
                state["step"] = 0
                if use_first_moment:
                    state["exp_avg"] = torch.zeros_like(p.grad, dtype=grad.dtype)
                if factored:
                    state["exp_avg_sq_row"] = sharded_like(p, grad.new_zeros(grad.shape[:-1]), p.shape[:-1])
                    state["exp_avg_sq_col"] = grad.new_zeros(p.shape[-1:])
                else:
                    state["exp_avg_sq"] = torch.zeros_like(p.grad, dtype=grad.dtype)
                state["RMS"] = 0
            state["step"] += 1
            beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
            update = (grad**2) + group["eps"][0]
            parts = [local(p).float().square().sum().reshape(1)]
            if factored:
                row = local(state["exp_avg_sq_row"])
                row.mul_(beta2t).add_(update.mean(dim=-1), alpha=(1.0 - beta2t))
                parts += [update.sum(dim=-2), row.sum().reshape(1)]
            else:
                local(state["exp_avg_sq"]).mul_(beta2t).add_(update, alpha=(1.0 - beta2t))
            grads.append(grad)
            sums.append(torch.cat(parts))
        totals = all_reduce_sum_(torch.cat(sums), process_group).split([s.numel() for s in sums])
        for p, grad, total in zip(params, grads, totals):
            state = self.state[p]
            factored, _ = self._get_options(group, p.shape)
            state["RMS"] = total[0].sqrt() / (p.numel() ** 0.5)
            beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
            if factored:
                rows = p.shape[0]
                col = state["exp_avg_sq_col"]
                col.mul_(beta2t).add_(total[1:-1] / rows, alpha=(1.0 - beta2t))
                row = local(state["exp_avg_sq_row"])
                r_factor = (row / (total[-1] / rows)).rsqrt_().unsqueeze(-1)
                update = torch.mul(r_factor, col.unsqueeze(-2).rsqrt()).mul_(grad)
            else:
                update = local(state["exp_avg_sq"]).rsqrt().mul_(grad)
            updates.append(update)
        update_sq = all_reduce_sum_(torch.stack([u.square().sum() for u in updates]), process_group)
        for p, update, square_sum in zip(params, updates, update_sq.unbind(0)):
            state = self.state[p]
            lr = self._get_lr(group, state)
            update.div_((square_sum.sqrt() / (p.numel() ** 0.5) / group["clip_threshold"]).clamp_(min=1.0))
            update.mul_(lr)
            if "exp_avg" in state:
                exp_avg = local(state["exp_avg"])
                exp_avg.mul_(group["beta1"]).add_(update, alpha=(1 - group["beta1"]))
                update = exp_avg
            shard = local(p)
            p_data_fp32 = shard.float() if shard.dtype in (torch.float16, torch.bfloat16) else shard
            if group["weight_decay"] != 0:
                p_data_fp32.add_(p_data_fp32, alpha=(-group["weight_decay"] * lr))
            p_data_fp32.add_(-update)
            if shard.dtype in (torch.float16, torch.bfloat16):
                shard.copy_(p_data_fp32)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restore_saved_dtypes(self, state_dict)
