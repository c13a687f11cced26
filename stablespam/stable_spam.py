"""Stable-SPAM (arXiv 2502.17055) as a fused multi-tensor optimizer.

Why our own implementation: the official code is a per-tensor Python loop with two host syncs per
tensor (about 30x fused AdamW on an H100), keeps its statistics in the parameter dtype (they stall
in bf16) and leaves its step counter and cosine outside `state_dict()`. This version runs AdaClip and
AdaGN from `transforms.py` (the same functions the composable `Stabilized` wrapper uses) and an Adam
update with `torch._foreach_*` ops, with no `.item()` and no Python branch on tensor values, and can
compile the per-bucket step with `torch.compile`.

Two modes (see docs/optimizers.md and shared/reference/stable-spam.md):
- "official" reproduces the official step: one per-tensor counter k drives the statistics' bias
  corrections and is reset to 1 at every momentum reset (quirk 1); the reset zeroes the moments
  *after* that step's update, which uses the old moments with k=1 corrections (quirk 2); the beta1 /
  gamma1 cosine keeps following the cosine past `total_steps`.
- "corrected" keeps a never-reset counter for the statistics, zeroes the moments before the reset
  step's update (so the reset step's gradient enters the fresh moments with k=1, as in
  pytorch-optimizer >= 4.0), and holds the cosine at eta_min after `total_steps`.
In both modes an all-zero gradient still takes an Adam step with its old momentum (quirk 3, which is
also what torch.optim.Adam does) and the running statistics are fp32 (quirk 4 fixed).

The global step t lives in each param group (`group["global_step"]`) and every per-tensor counter in
the per-parameter state, so `state_dict()` carries the reset phase and the cosine position. Under a
gated step (gating.py) t counts calls, skipped ones too, while the per-tensor counters count updates
taken and are 0-dim fp64 device tensors; the step then computes its scalars on the device.

Sharded (FSDP2) parameters step on their local shards, with AdaClip's max |g| and AdaGN's norms
reduced over the shards (one all-reduce each per bucket, sharding.py), so they are the whole
tensor's, as under DDP.

`state_bits=8|4` keeps Adam's moments as block-wise codes (quantized_state.py): the stabilizers run
as above, then the Adam update runs chunk by chunk on dequantized fp32 moments, which are re-quantized
(or, at a reset, replaced by zero codes and scales).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

import torch.distributed as dist

from stablespam._state import GroupwiseOptimizer
from stablespam.quantized_state import (
    MOMENTS,
    STATE_BITS,
    DequantizedMoment,
    init_moments,
    moment_chunks,
    zero_moments_,
)
from stablespam.sharding import local, locals_, shard_group
from stablespam.transforms import adaclip_, adagn_, momentum_scale

MODES = ("official", "corrected")


def stat_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Running statistics are fp32 for bf16/fp16/fp32 parameters and fp64 for fp64 ones."""
    return torch.promote_types(param_dtype, torch.float32)
_STAT_KEYS = ("max_ema", "norm_ema", "norm_sq_ema")


class StepScalars(NamedTuple):
    """The numbers of one bucket's step that change from step to step.

    Python floats in eager mode. Under `compile=True` they are 0-dim tensors on the parameters'
    device: a float argument becomes a guard of the compiled graph, and the learning-rate schedule,
    the beta1/gamma1 cosine and the bias corrections would fail it (and recompile) every step.
    """

    beta1: float | torch.Tensor
    gamma1: float | torch.Tensor
    clip_correction: float | torch.Tensor  # 1 - gamma3^k
    norm_correction: float | torch.Tensor  # 1 - gamma1^k
    norm_sq_correction: float | torch.Tensor  # 1 - gamma2^k
    step_size: float | torch.Tensor  # -lr / (1 - beta1^k_adam)
    bias_correction2_sqrt: float | torch.Tensor  # sqrt(1 - beta2^k_adam)

    def to_tensors(self, device: torch.device, dtype: torch.dtype) -> StepScalars:
        if not any(isinstance(v, torch.Tensor) for v in self):
            return StepScalars(*torch.tensor(self, dtype=dtype, device=device).unbind(0))
        # a gated step's device scalars stay where they are; host floats are filled in, not copied
        return StepScalars(*(v.to(dtype) if isinstance(v, torch.Tensor)
                             else torch.full((), v, dtype=dtype, device=device) for v in self))


def _corrections(lr: float, beta1: float, beta2: float, k: int | torch.Tensor) -> tuple[Any, Any]:
    """-lr / (1 - beta1^k) and sqrt(1 - beta2^k), also for a device counter (gating.py): true division
    and pow(x, 0.5) in fp64, as the host float arithmetic does (`x / t` and `t ** 0.5` would not)."""
    if not isinstance(k, torch.Tensor):
        return -lr / (1.0 - beta1**k), (1.0 - beta2**k) ** 0.5
    return (torch.div(k.new_full((), -lr), 1.0 - beta1**k),
            torch.pow(1.0 - beta2**k, k.new_full((), 0.5)))


def adam_update_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    beta1: float | torch.Tensor,
    beta2: float,
    eps: float,
    step_size: float | torch.Tensor,
    bias_correction2_sqrt: float | torch.Tensor,
    workspace: list[torch.Tensor] | None = None,
) -> None:
    """One Adam update, op for op as torch.optim.Adam(foreach=True); `step_size` = -lr / (1 - beta1^k).

    `workspace` (tensors shaped and typed like `exp_avg_sqs`, overwritten) holds the denominator
    instead of a fresh allocation, which on CPU costs more than computing it.
    """
    if grads[0].dtype != exp_avgs[0].dtype:
        grads = [g.to(exp_avgs[0].dtype) for g in grads]
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    if workspace is None:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    else:
        denom = workspace
        for root, exp_avg_sq in zip(denom, exp_avg_sqs):
            torch.sqrt(exp_avg_sq, out=root)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    if params[0].dtype == exp_avgs[0].dtype and isinstance(step_size, torch.Tensor):
        # addcdiv takes no device-tensor scale: its p + s * m / d op by op, in its compute dtype
        compute = torch.promote_types(params[0].dtype, torch.float32)
        update = torch._foreach_mul([m.to(compute) for m in exp_avgs], step_size)
        torch._foreach_div_(update, [d.to(compute) for d in denom])
        if compute == params[0].dtype:
            torch._foreach_add_(params, update)
        else:
            torch._foreach_copy_(params, torch._foreach_add([p.to(compute) for p in params], update))
    elif params[0].dtype == exp_avgs[0].dtype:
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)
    else:
        torch._foreach_add_(params, torch._foreach_mul(torch._foreach_div(exp_avgs, denom), step_size))


def _stabilize_(
    grads: list[torch.Tensor],
    max_emas: list[torch.Tensor],
    norm_emas: list[torch.Tensor],
    norm_sq_emas: list[torch.Tensor],
    scalars: StepScalars,
    gamma2: float,
    gamma3: float,
    eps: float,
    group: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """AdaClip -> AdaGN on `grads` in place, updating the statistics; returns AdaClip's scratch tensors.

    `group`: the process group the (local shards of) `grads` are sharded over, for whole-tensor statistics.
    """
    max_ema = torch.stack(max_emas)
    norm_ema = torch.stack(norm_emas)
    norm_sq_ema = torch.stack(norm_sq_emas)
    workspace = [torch.empty_like(g) for g in grads]
    adaclip_(grads, max_ema, gamma3, scalars.clip_correction, workspace, group)
    adagn_(grads, norm_ema, norm_sq_ema, scalars.gamma1, gamma2, scalars.norm_correction,
           scalars.norm_sq_correction, eps, group)
    torch._foreach_copy_(max_emas, list(max_ema.unbind(0)))
    torch._foreach_copy_(norm_emas, list(norm_ema.unbind(0)))
    torch._foreach_copy_(norm_sq_emas, list(norm_sq_ema.unbind(0)))
    return workspace


def _stable_spam_bucket(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_emas: list[torch.Tensor],
    norm_emas: list[torch.Tensor],
    norm_sq_emas: list[torch.Tensor],
    scalars: StepScalars,
    *,
    beta2: float,
    eps: float,
    gamma2: float,
    gamma3: float,
    reset: bool,
    official: bool,
    group: dist.ProcessGroup | None = None,
) -> None:
    """AdaClip -> AdaGN -> (MoRet) -> Adam for tensors that share device, dtype and counters."""
    workspace = _stabilize_(grads, max_emas, norm_emas, norm_sq_emas, scalars, gamma2, gamma3, eps, group)
    if reset and not official:
        torch._foreach_zero_(exp_avgs)
        torch._foreach_zero_(exp_avg_sqs)
    reusable = workspace[0].dtype == exp_avg_sqs[0].dtype
    adam_update_(params, grads, exp_avgs, exp_avg_sqs, scalars.beta1, beta2, eps, scalars.step_size,
                 scalars.bias_correction2_sqrt, workspace if reusable else None)
    if reset and official:
        torch._foreach_zero_(exp_avgs)
        torch._foreach_zero_(exp_avg_sqs)


def _quantized_bucket(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    scalars: StepScalars,
    *,
    bits: int,
    beta2: float,
    eps: float,
    gamma2: float,
    gamma3: float,
    reset: bool,
    official: bool,
) -> None:
    """`_stable_spam_bucket` with `bits`-bit moments, dequantized and re-quantized chunk by chunk.

    A reset zeroes codes and scales: before the update (corrected), or instead of storing the
    updated moments (official).
    """
    workspace = _stabilize_(grads, [s["max_ema"] for s in states], [s["norm_ema"] for s in states],
                            [s["norm_sq_ema"] for s in states], scalars, gamma2, gamma3, eps)
    if reset and not official:
        zero_moments_(states)
    reusable = workspace[0].dtype == torch.float32
    for chunk in moment_chunks([p.numel() for p in params], bits):
        chunk_states = [states[i] for i in chunk]
        moments = [DequantizedMoment(chunk_states, key, [params[i].shape for i in chunk], bits, signed)
                   for key, signed in MOMENTS]
        adam_update_([params[i] for i in chunk], [grads[i] for i in chunk], moments[0].tensors,
                     moments[1].tensors, scalars.beta1, beta2, eps, scalars.step_size,
                     scalars.bias_correction2_sqrt, [workspace[i] for i in chunk] if reusable else None)
        if reset and official:
            zero_moments_(chunk_states)
        else:
            for moment in moments:
                moment.store()


class StableSPAM(GroupwiseOptimizer):
    """Adam with AdaClip, AdaGN and momentum reset (MoRet); see the module docstring for `mode`.

    `reset_interval` is the paper's Delta T (official `update_proj_gap`, 0 = never); `total_steps` the
    official `total_T` (cosine decay of beta1 and gamma1 to `eta_min`, None = no decay);
    `gamma1=-1` means "use beta1". `fp32_moments=True` keeps Adam's moments in fp32 for bf16
    parameters (default: parameter dtype, like torch.optim.Adam and the official code).
    `state_bits=8|4` stores the moments as block-wise codes (quantized_state.py; computed in fp32,
    `fp32_moments` has no effect then). `compile=True` runs each bucket's step through
    `torch.compile` (32-bit states only). step() overwrites `.grad` with the stabilized gradient (the
    official code does too).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        gamma1: float = 0.7,
        gamma2: float = 0.9,
        gamma3: float = 0.999,
        reset_interval: int = 1000,
        total_steps: int | None = None,
        eta_min: float = 0.5,
        mode: str = "official",
        fp32_moments: bool = False,
        compile: bool = False,
        state_bits: int = 32,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"StableSPAM mode must be one of {MODES}, got {mode!r}")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be non-negative")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if reset_interval < 0:
            raise ValueError(f"reset_interval must be >= 0 (0 = never), got {reset_interval}")
        if state_bits not in STATE_BITS:
            raise ValueError(f"state_bits must be one of {STATE_BITS}, got {state_bits}")
        if compile and state_bits != 32:
            raise ValueError("compile=True needs state_bits=32 (quantized moments run eagerly)")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            gamma1=betas[0] if gamma1 == -1 else gamma1, gamma2=gamma2, gamma3=gamma3,
            reset_interval=reset_interval, total_steps=total_steps, eta_min=eta_min, mode=mode,
            fp32_moments=fp32_moments, state_bits=state_bits, global_step=0,
        )
        super().__init__(params, defaults)
        self._compiled = compile
        self._bucket_step: Callable[..., None] = (
            torch.compile(_stable_spam_bucket) if compile else _stable_spam_bucket
        )

    def _init_state(self, p: torch.Tensor, fp32_moments: bool, bits: int) -> dict[str, Any]:
        state = self.state[p]
        moment_dtype = torch.float32 if fp32_moments else p.dtype
        state["step"] = 0
        state["stat_step"] = 0
        if bits == 32:
            state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
        else:
            init_moments(state, p.shape, p.device, bits, moment_dtype)
        for key in _STAT_KEYS:
            state[key] = torch.zeros((), dtype=stat_dtype(p.dtype), device=p.device)
        return state

    def _step_group(self, group: dict[str, Any]) -> None:
        group["global_step"] += 1
        t = group["global_step"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("StableSPAM does not support sparse gradients")
        official = group["mode"] == "official"
        scale = momentum_scale(t, group["total_steps"], group["eta_min"], clamp=not official)
        beta1, beta2 = group["betas"][0] * scale, group["betas"][1]  # beta1 and gamma1 follow the cosine
        gamma1, gamma2, gamma3 = group["gamma1"] * scale, group["gamma2"], group["gamma3"]
        interval = group["reset_interval"]
        reset = interval > 0 and t % interval == 0
        bits = group["state_bits"]

        buckets: dict[tuple[Any, ...], list[torch.Tensor]] = defaultdict(list)
        for p in params:
            state = self.state[p] or self._init_state(p, group["fp32_moments"], bits)
            restart = torch.ones_like(state["step"]) if isinstance(state["step"], torch.Tensor) else 1
            if official:
                stat_step = state["step"] + 1
                adam_step = restart if reset else stat_step
            else:
                stat_step = state["stat_step"] + 1
                adam_step = restart if reset else state["step"] + 1
            state["stat_step"], state["step"] = stat_step, adam_step
            moment_dtype = state["exp_avg"].dtype if bits == 32 else torch.float32
            buckets[(p.device, p.dtype, moment_dtype, stat_step, adam_step)].append(p)

        if group["weight_decay"] != 0:
            torch._foreach_mul_(locals_(params), 1.0 - group["lr"] * group["weight_decay"])
        for (device, param_dtype, _, stat_step, adam_step), bucket in buckets.items():
            step_size, bias_correction2_sqrt = _corrections(group["lr"], beta1, beta2, adam_step)
            scalars = StepScalars(
                beta1=beta1,
                gamma1=gamma1,
                clip_correction=1.0 - gamma3**stat_step,
                norm_correction=1.0 - gamma1**stat_step,
                norm_sq_correction=1.0 - gamma2**stat_step,
                step_size=step_size,
                bias_correction2_sqrt=bias_correction2_sqrt,
            )
            if self._compiled:
                scalars = scalars.to_tensors(device, stat_dtype(param_dtype))
            states = [self.state[p] for p in bucket]
            if bits != 32:
                _quantized_bucket(bucket, [p.grad for p in bucket], states, scalars, bits=bits, beta2=beta2,
                                  eps=group["eps"], gamma2=gamma2, gamma3=gamma3, reset=reset, official=official)
                continue
            self._bucket_step(
                locals_(bucket),
                [local(p.grad) for p in bucket],
                [local(s["exp_avg"]) for s in states],
                [local(s["exp_avg_sq"]) for s in states],
                [s["max_ema"] for s in states],
                [s["norm_ema"] for s in states],
                [s["norm_sq_ema"] for s in states],
                scalars,
                beta2=beta2,
                eps=group["eps"],
                gamma2=gamma2,
                gamma3=gamma3,
                reset=reset,
                official=official,
                group=shard_group(bucket),
            )
