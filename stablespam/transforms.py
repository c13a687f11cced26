"""Gradient transforms of Stable-SPAM (AdaClip, AdaGN) and SPAM (SpikeClip), as multi-tensor functions.

Each function rewrites a list of gradients in place with `torch._foreach_*` ops and per-tensor
`torch.where`, never reading a tensor value on the host, so a step costs no device->host sync. The
per-tensor running statistics are 1-D vectors (one entry per tensor) in fp32, or fp64 for fp64
gradients, never in bf16/fp16: EMAs with (1 - gamma) = 1e-3 stall in bf16 (reference quirk 4).

`StableSPAM` calls these functions directly; `Stabilized` (stabilizers.py) calls them in front of any
base optimizer, so both share one implementation of each mechanism.
"""
from __future__ import annotations

import math

import torch

_INF = float("inf")


def momentum_scale(step: int, total_steps: int | None, eta_min: float, clamp: bool) -> float:
    """Stable-SPAM's cosine factor s(t) on beta1 and gamma1: 1 at t=0, eta_min at t=total_steps+1.

    The official code keeps following the cosine after total_steps (s rises back towards 1);
    `clamp=True` holds it at eta_min from t = total_steps + 1 on.
    """
    if total_steps is None:
        return 1.0
    t = min(step, total_steps + 1) if clamp else step
    return eta_min + (1.0 - eta_min) * (1.0 + math.cos(math.pi * t / (total_steps + 1))) / 2.0


def adaclip_(
    grads: list[torch.Tensor], max_ema: torch.Tensor, gamma3: float, bias_correction: float
) -> torch.Tensor:
    """AdaClip: rescale entries with |g| above the bias-corrected EMA of max |g| by threshold / max |g|.

    `max_ema` (fp32, one entry per tensor) is updated in place. Returns the thresholds. Entries are
    multiplied by a factor < 1, so no |g| ever grows and signs are kept.
    """
    grad_max = torch.stack(torch._foreach_norm(grads, _INF, dtype=max_ema.dtype))
    max_ema.mul_(gamma3).add_(grad_max, alpha=1.0 - gamma3)
    threshold = max_ema / bias_correction
    ratio = threshold / grad_max
    for grad, thr, r in zip(grads, threshold.unbind(0), ratio.unbind(0)):
        grad.mul_(torch.where(grad.abs() > thr, r, 1.0))
    return threshold


def adagn_(
    grads: list[torch.Tensor],
    norm_ema: torch.Tensor,
    norm_sq_ema: torch.Tensor,
    gamma1: float,
    gamma2: float,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
) -> torch.Tensor:
    """AdaGN: rescale each tensor's gradient to norm m_hat / (sqrt(v_hat) + eps) of its norm EMAs.

    `norm_ema`, `norm_sq_ema` (fp32 vectors) are updated in place, also for all-zero gradients
    (which stay zero), as in the official code. Returns the target norms.
    """
    norms = torch.stack(torch._foreach_norm(grads, 2, dtype=norm_ema.dtype))
    norm_ema.mul_(gamma1).add_(norms, alpha=1.0 - gamma1)
    norm_sq_ema.mul_(gamma2).add_(norms * norms, alpha=1.0 - gamma2)
    target = (norm_ema / bias_correction1) / ((norm_sq_ema / bias_correction2).sqrt() + eps)
    factor = torch.where(norms > 0, target / norms, 1.0)
    torch._foreach_mul_(grads, list(factor.unbind(0)))
    return target


def spike_clip_(grads: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], threshold: float) -> None:
    """SPAM's spike clipping: where g^2 > threshold * v, set g = sign(g) * sqrt(threshold * v).

    `v` is the optimizer's (uncorrected) second moment before this step's update.
    """
    for grad, v in zip(grads, exp_avg_sqs):
        limit = v * threshold
        grad.copy_(torch.where(grad * grad > limit, grad.sign() * limit.sqrt(), grad))
