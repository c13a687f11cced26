"""Gradient transforms of Stable-SPAM (AdaClip, AdaGN), SPAM (SpikeClip) and GradientStabilizer, as
multi-tensor functions.

Each function rewrites a list of gradients in place and never reads a tensor value on the host, so
a step costs no device->host sync. The per-tensor running statistics are 1-D vectors (one entry per
tensor) in fp32, or fp64 for fp64 gradients, never in bf16/fp16: EMAs with (1 - gamma) = 1e-3 stall
in bf16 (reference quirk 4).

AdaClip is written for memory traffic, which is what an optimizer step costs on CPU: the clip
factor is built in one float scratch tensor per gradient with in-place float ops (|g|, |g| <= thr,
then keep * (1 - r) + r, which is exactly 1 or exactly r), because bool masks, `torch.where` and
`linalg.vector_norm(inf)` each run several times slower than a float elementwise op on CPU, and a
fresh allocation per op costs more than the op itself (page faults). Callers that need a scratch
tensor later in the step (StableSPAM's Adam denominator) pass it in and reuse it.

`StableSPAM` calls these functions directly; `Stabilized` (stabilizers.py) calls them in front of any
base optimizer, so both share one implementation of each mechanism.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from stablespam.sharding import all_reduce_max_, all_reduce_sum_


class TransformStats:
    """What the gradient transforms did during the steps taken inside `recording(stats)`, as device
    tensors (no host sync): entries clipped by AdaClip and by SPAM's SpikeClip, tensors whose
    gradient AdaGN or GradientStabilizer scaled down, and the tensors each of them saw."""

    def __init__(self, device: torch.device | str) -> None:
        counters = torch.zeros(6, dtype=torch.int64, device=device).unbind(0)
        self.adaclip_clipped, self.adaclip_entries, self.spike_clipped, self.spike_entries = counters[:4]
        self.norm_scaled_down, self.norm_tensors = counters[4:]

    def read(self, group: dist.ProcessGroup | None = None) -> dict[str, float | int]:
        """Host values (one sync) of the mechanisms that ran; the loop logs them.

        `group`: the shard group of sharded (FSDP2) parameters, whose per-entry counts each rank
        made on its own shards (a collective: every rank calls it). The per-tensor counts are the
        whole tensors' on every rank already.
        """
        if group is not None:
            entries = torch.stack([self.adaclip_clipped, self.adaclip_entries, self.spike_clipped, self.spike_entries])
            all_reduce_sum_(entries, group)
            for counter, total in zip((self.adaclip_clipped, self.adaclip_entries, self.spike_clipped,
                                       self.spike_entries), entries.unbind(0)):
                counter.copy_(total)
        values: dict[str, float | int] = {}
        if int(self.adaclip_entries):
            values["adaclip_clipped_entries"] = int(self.adaclip_clipped)
        if int(self.spike_entries):
            values["spike_clipped_entries"] = int(self.spike_clipped)
        if int(self.norm_tensors):
            values["norm_scaled_down_fraction"] = int(self.norm_scaled_down) / int(self.norm_tensors)
        return values


_recording: TransformStats | None = None


@contextmanager
def recording(stats: TransformStats) -> Iterator[TransformStats]:
    """Count into `stats` what the transforms do inside the block (eager steps only: a compiled
    optimizer step is not counted)."""
    global _recording
    _recording = stats
    try:
        yield stats
    finally:
        _recording = None


def _stats() -> TransformStats | None:
    return None if torch.compiler.is_compiling() else _recording


def momentum_scale(step: int, total_steps: int | None, eta_min: float, clamp: bool) -> float:
    """Stable-SPAM's cosine factor s(t) on beta1 and gamma1: 1 at t=0, eta_min at t=total_steps+1.

    The official code keeps following the cosine after total_steps (s rises back towards 1);
    `clamp=True` holds it at eta_min from t = total_steps + 1 on.
    """
    if total_steps is None:
        return 1.0
    t = min(step, total_steps + 1) if clamp else step
    return eta_min + (1.0 - eta_min) * (1.0 + math.cos(math.pi * t / (total_steps + 1))) / 2.0


def tensor_norms(grads: list[torch.Tensor], dtype: torch.dtype, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Each tensor's L2 norm as one vector; over `group`, the whole tensor's from the shards' squared norms."""
    norms = torch.stack(torch._foreach_norm(grads, 2, dtype=dtype))
    if group is None:
        return norms
    return all_reduce_sum_(norms * norms, group).sqrt()


def adaclip_(
    grads: list[torch.Tensor],
    max_ema: torch.Tensor,
    gamma3: float,
    bias_correction: float | torch.Tensor,
    workspace: list[torch.Tensor] | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """AdaClip: rescale entries with |g| above the bias-corrected EMA of max |g| by threshold / max |g|.

    `max_ema` (fp32, one entry per tensor) is updated in place. Returns the thresholds. Entries are
    multiplied by a factor < 1, so no |g| ever grows and signs are kept. `grads` share one dtype.
    `workspace`: tensors shaped and typed like `grads`, overwritten (allocated here when None).
    `group`: the process group `grads` (local shards) are sharded over; max |g| is the whole tensor's.
    """
    if workspace is None:
        workspace = [torch.empty_like(g) for g in grads]
    grad_max = torch.stack([torch.abs(g, out=magnitude).amax() if g.numel() else g.new_zeros(())
                            for g, magnitude in zip(grads, workspace)])
    grad_max = all_reduce_max_(grad_max.to(max_ema.dtype), group)
    max_ema.lerp_(grad_max, 1.0 - gamma3)
    threshold = max_ema / bias_correction
    # r = 1 where nothing is clipped, which also keeps all-zero gradients (max 0) finite.
    ratio = torch.where(grad_max > threshold, threshold / grad_max, 1.0).to(grads[0].dtype)
    # In the gradient's own dtype fl(r + fl(1 - r)) == 1, so the factor is exactly 1 or exactly r.
    keep_scale = 1.0 - ratio
    for factor, thr, r, k in zip(workspace, threshold.unbind(0), ratio.unbind(0), keep_scale.unbind(0)):
        factor.le_(thr).mul_(k).add_(r)
    if (stats := _stats()) is not None:
        stats.adaclip_clipped += sum((factor < 1).sum() for factor in workspace)
        stats.adaclip_entries += sum(g.numel() for g in grads)
    torch._foreach_mul_(grads, workspace)
    return threshold


def adagn_(
    grads: list[torch.Tensor],
    norm_ema: torch.Tensor,
    norm_sq_ema: torch.Tensor,
    gamma1: float | torch.Tensor,
    gamma2: float,
    bias_correction1: float | torch.Tensor,
    bias_correction2: float | torch.Tensor,
    eps: float,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """AdaGN: rescale each tensor's gradient to norm m_hat / (sqrt(v_hat) + eps) of its norm EMAs.

    `norm_ema`, `norm_sq_ema` (fp32 vectors) are updated in place, also for all-zero gradients
    (which stay zero), as in the official code. Returns the target norms. `group`: as in `adaclip_`.
    """
    norms = tensor_norms(grads, norm_ema.dtype, group)
    norm_ema.lerp_(norms, 1.0 - gamma1)
    norm_sq_ema.lerp_(norms * norms, 1.0 - gamma2)
    target = (norm_ema / bias_correction1) / ((norm_sq_ema / bias_correction2).sqrt() + eps)
    factor = torch.where(norms > 0, target / norms, 1.0)
    if (stats := _stats()) is not None:
        stats.norm_scaled_down += (factor < 1).sum()
        stats.norm_tensors += len(grads)
    torch._foreach_mul_(grads, list(factor.unbind(0)))
    return target


def spike_clip_(grads: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], threshold: float) -> None:
    """SPAM's spike clipping: where g^2 > threshold * v, set g = sign(g) * sqrt(threshold * v).

    `v` is the optimizer's (uncorrected) second moment before this step's update. That is a clamp of
    g to [-sqrt(threshold * v), sqrt(threshold * v)], done in place with one scratch tensor.
    """
    stats = _stats()
    for grad, v in zip(grads, exp_avg_sqs):
        bound = (v * threshold).sqrt_()
        if stats is not None:
            stats.spike_clipped += (grad.abs() > bound).sum()
            stats.spike_entries += grad.numel()
        torch.minimum(grad, bound, out=grad)
        torch.maximum(grad, bound.neg_(), out=grad)


def gradient_stabilize_(
    grads: list[torch.Tensor],
    norm_ema: torch.Tensor,
    norm_sq_ema: torch.Tensor,
    count: torch.Tensor,
    skipped: torch.Tensor,
    gamma1: float,
    gamma2: float,
    eps: float,
    bias_correction: bool,
    group: dist.ProcessGroup | None = None,
) -> None:
    """GradientStabilizer: rescale each gradient to norm m_hat / (sqrt(v_hat) + eps), keeping its direction.

    m, v are EMAs of the tensor's norm and squared norm (`norm_ema`, `norm_sq_ema`, fp32 vectors,
    one entry per tensor); `count` (int64) counts their updates for the bias corrections. A tensor
    whose norm is not finite or is zero is left as it is (multiplied by exactly 1), does not move
    its statistics or `count`, and is counted in `skipped` (int64). All of it stays on the device.
    `group`: as in `adaclip_`.
    """
    norms = tensor_norms(grads, norm_ema.dtype, group)
    ok = torch.isfinite(norms) & (norms > 0)
    count.add_(ok)
    skipped.add_(~ok)
    norm_ema.copy_(torch.where(ok, norm_ema.lerp(norms, 1.0 - gamma1), norm_ema))
    norm_sq_ema.copy_(torch.where(ok, norm_sq_ema.lerp(norms * norms, 1.0 - gamma2), norm_sq_ema))
    m_hat, v_hat = norm_ema, norm_sq_ema
    if bias_correction:  # count is 0 only where ok is False, whose 0/0 torch.where discards
        k = count.to(norm_ema.dtype)
        m_hat = norm_ema / (1.0 - torch.pow(gamma1, k))
        v_hat = norm_sq_ema / (1.0 - torch.pow(gamma2, k))
    target = m_hat / (v_hat.sqrt() + eps)
    factor = torch.where(ok, target / norms.clamp_min(eps), 1.0)
    if (stats := _stats()) is not None:
        stats.norm_scaled_down += (factor < 1).sum()
        stats.norm_tensors += len(grads)
    torch._foreach_mul_(grads, list(factor.unbind(0)))
