"""SPAM (arXiv 2501.06842): Adam with momentum reset, spike clipping and sparse momentum.

Why our own implementation: the official code has bugs we fix by default (reference
shared/reference/stable-spam.md): its trainer feeds the LR warmup (1000) as the post-reset warmup,
so with Delta T = 500 the update scale never exceeds ~0.5 (here `warmup_steps` is its own setting);
weight decay is a no-op for masked groups (fixed: masked entries decay); masks are resampled one
step before the moments are zeroed, which throws the carried-over moments away (here masks are
resampled at the reset step itself, where moments restart from zero). Sparse momentum keeps the
official semantics: with density < 1 only the masked entries are updated.

Schedule, with n the 1-based call count of step():
- n % reset_interval == 0: moments zeroed before the update (the Adam step count is NOT reset);
- spike clipping (g^2 > threshold * v -> sign(g) sqrt(threshold * v), v uncorrected, before this
  step's update) is off while n < clip_delay or n % reset_interval < clip_delay: the official
  "grad_accu_steps" = 20 steps after each reset, where v is still near zero (undocumented in the
  paper);
- the update is scaled by 1 - 0.99 (1 + cos(pi c / (warmup_steps + 1))) / 2 for c = n % reset_interval
  < warmup_steps after the first reset (0.01 at the reset step, rising to 1), and by 1 otherwise.
`state_bits=8|4` keeps the (dense or masked) moments as block-wise codes (quantized_state.py), updated
in fp32 chunk by chunk; a reset zeroes codes and scales.
Every counter lives in `group["global_step"]` and the masks (index tensors) in the per-parameter
state; masks are drawn from generators seeded by (mask_seed, reset index, parameter index), so a
resumed run draws the same masks without any saved RNG state.
Sharded (FSDP2) parameters: the mask is drawn over the whole tensor as above and kept as a bool
DTensor like the parameter, and the moments are dense DTensors, zero outside the mask (so the
shards select exactly the unsharded run's entries, and DCP can save and reshard them).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from stablespam._state import evaluate_closure, restore_saved_dtypes
from stablespam.quantized_state import (
    MOMENTS,
    STATE_BITS,
    DequantizedMoment,
    init_moments,
    moment_chunks,
    zero_moments_,
)
from stablespam.sharding import dense_mask, is_sharded, local, locals_
from stablespam.transforms import spike_clip_


def warmup_scale(since_reset: int | None, warmup_steps: int) -> float:
    """SPAM's post-reset update scale: 0.01 at the reset step, cosine up to 1 after `warmup_steps`."""
    if since_reset is None or since_reset >= warmup_steps:
        return 1.0
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * since_reset / (warmup_steps + 1))) / 2.0


class SPAM(torch.optim.Optimizer):
    """SPAM with the official schedule and the documented bugs fixed (see module docstring).

    `density` (per group) < 1 keeps moments only for a random subset of each tensor's entries,
    redrawn at every reset. The official trainer gives density to the attention/MLP linear weights.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        density: float = 1.0,
        threshold: float = 5000.0,
        reset_interval: int = 500,
        warmup_steps: int = 150,
        clip_delay: int = 20,
        mask_seed: int = 0,
        state_bits: int = 32,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must lie in (0, 1], got {density}")
        if reset_interval < 0 or warmup_steps < 0 or clip_delay < 0 or threshold < 0:
            raise ValueError("reset_interval, warmup_steps, clip_delay and threshold must be >= 0")
        if state_bits not in STATE_BITS:
            raise ValueError(f"state_bits must be one of {STATE_BITS}, got {state_bits}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, density=density,
                        threshold=threshold, reset_interval=reset_interval, warmup_steps=warmup_steps,
                        clip_delay=clip_delay, mask_seed=mask_seed, state_bits=state_bits, global_step=0)
        super().__init__(params, defaults)

    def _draw_mask(self, p: torch.Tensor, density: float, seed: int, reset_index: int,
                   param_index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(
            (seed * 0x9E3779B1 + reset_index * 0x85EBCA6B + param_index) % 2**63
        )
        count = int(density * p.numel())
        indices = torch.randperm(p.numel(), generator=generator)[:count]
        return indices.sort().values.to(p.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate_closure(closure)
        for group_index, group in enumerate(self.param_groups):
            group["global_step"] += 1
            self._step_group(group, group_index)
        return loss

    def _step_group(self, group: dict[str, Any], group_index: int) -> None:
        n = group["global_step"]
        interval, delay = group["reset_interval"], group["clip_delay"]
        reset = interval > 0 and n % interval == 0
        since = n % interval if interval > 0 and n >= interval else None
        scale = warmup_scale(since, group["warmup_steps"])
        clip = group["threshold"] != 0 and n >= delay and (interval == 0 or n % interval >= delay)
        masked = group["density"] < 1.0
        bits = group["state_bits"]

        params, grads = [], []
        for param_index, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            sharded = is_sharded(p)
            if masked and ("mask" not in state or reset):
                state["mask"] = self._draw_mask(p, group["density"], group["mask_seed"],
                                                n // interval if interval else 0,
                                                group_index * 1_000_003 + param_index)
                if sharded:
                    state["mask"] = dense_mask(p, state["mask"])
            if sharded:  # dense moments like p, zero outside the mask (sharding.dense_mask)
                grad = torch.where(local(state["mask"]), local(p.grad), 0) if masked else local(p.grad)
            else:
                grad = p.grad.reshape(-1).index_select(0, state["mask"]) if masked else p.grad
            if "step" not in state:
                state["step"] = 0
                if sharded:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p.grad), torch.zeros_like(p.grad)
                else:
                    init_moments(state, grad.shape, grad.device, bits, grad.dtype)
            elif reset:
                zero_moments_([state])
            state["step"] += 1
            params.append(p)
            grads.append(grad.clone() if masked and not sharded else grad)
        if not params:
            return
        states = [self.state[p] for p in params]
        for chunk in moment_chunks([g.numel() for g in grads], bits):
            chunk_states = [states[i] for i in chunk]
            moments = [DequantizedMoment(chunk_states, key, [grads[i].shape for i in chunk], bits, signed)
                       for key, signed in MOMENTS]
            self._update(locals_(params[i] for i in chunk), [grads[i] for i in chunk], chunk_states,
                         locals_(moments[0].tensors), locals_(moments[1].tensors), group, clip, scale)
            for moment in moments:
                moment.store()

    @staticmethod
    def _update(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]],
                exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], group: dict[str, Any],
                clip: bool, scale: float) -> None:
        """Spike clipping, moment update and parameter update of tensors whose moments are float tensors."""
        masked = group["density"] < 1.0
        if exp_avgs[0].dtype != grads[0].dtype:
            grads = [g.to(exp_avgs[0].dtype) for g in grads]
        if clip:
            spike_clip_(grads, exp_avg_sqs, group["threshold"])
        beta1, beta2 = group["betas"]
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, group["eps"])
        lr, wd = group["lr"], group["weight_decay"]
        decay = 1.0 - lr * wd
        for p, state, m, d in zip(params, states, exp_avgs, denom):
            k = state["step"]
            step_size = lr * math.sqrt(1.0 - beta2**k) / (1.0 - beta1**k) * scale
            if not masked:
                p.addcdiv_(m, d, value=-step_size)
                if wd != 0:
                    p.mul_(decay)
                continue
            if is_sharded(state["mask"]):  # m is zero outside the mask: only masked entries move or decay
                p.addcdiv_(m, d, value=-step_size)
                if wd != 0:
                    p.mul_(torch.where(local(state["mask"]), decay, 1.0))
                continue
            flat = p.view(-1)
            mask = state["mask"]
            updated = flat.index_select(0, mask).addcdiv_(m, d, value=-step_size)
            if wd != 0:
                updated.mul_(decay)
            flat.index_copy_(0, mask, updated)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restore_saved_dtypes(self, state_dict)
