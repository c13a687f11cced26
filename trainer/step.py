"""One training step, shared by `train.py` and every benchmark script, and its device-side totals.

`train_step` runs the micro-batches of one global batch (gradient all-reduce, or FSDP2's
reduce-scatter, only on the last), measures the gradient norm (clipping only when asked), and
steps the optimizer. It reads nothing back to the host, also when the caller skips updates on a
device decision (`stablespam.gating`; only optimizers that need host counters read it, see there),
so a step on a GPU queues its kernels and returns. `RunningTotals` accumulates what the loop logs (loss, real tokens, the first
non-finite step, skipped updates and the longest run of them) on the device; the loop reads it
only on logging steps and before saving a checkpoint.

A batch is `{"input_ids": (B, T), "targets": (B, T)}` with `targets[b, i]` the token that follows
`input_ids[b, i]` and -100 where there is none, so only real next-token targets are counted.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from stablespam.gating import gated_step
from trainer.parallel import is_fsdp

IGNORE_INDEX = -100


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient and the policy says stop."""


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the real targets, in fp32.

    No attention mask: padding (paper mode) is always on the right, so with causal attention no
    real token ever attends to a pad token, and SDPA keeps its fast causal kernel.
    """
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def target_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["targets"] != IGNORE_INDEX).sum()


@dataclass
class StepOutput:
    """Device tensors of one step: mean loss over the global batch, gradient norm before clipping,
    global count of real target tokens, whether both loss and norm are finite; `skipped` (a device
    bool, None without `skip_if`) whether `skip_if` rejected the update."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    targets: torch.Tensor
    finite: torch.Tensor
    skipped: torch.Tensor | None = None


def nonfinite(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """`skip_if` for `trainer.nonfinite_policy=skip`: a NaN/inf loss or gradient norm."""
    return ~(torch.isfinite(loss) & torch.isfinite(grad_norm))


def gradient_norm(model: torch.nn.Module, accelerator: Accelerator, grad_clip: float) -> torch.Tensor:
    """Total L2 norm of the gradients before clipping; clips to `grad_clip` only when it is > 0.

    Sharded (FSDP2) gradients: the norm of the whole model, from the shards' norms in one all-reduce.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if is_fsdp(model):
        total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0).full_tensor()
        if grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, total)
        return total
    if grad_clip > 0:
        return accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: list[dict[str, torch.Tensor]], accelerator: Accelerator, *,
               grad_clip: float = 0.0,
               skip_if: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> StepOutput:
    """Forward/backward every micro-batch, then clip and step; see the module docstring.

    The loss is normalised by the global number of target tokens, so 1 and N processes (and any
    accumulation split) compute the same gradient. `skip_if(loss, grad_norm)` returns a device bool
    (e.g. "not finite", "a spike"); when given, the optimizer step is gated on it on the device
    (`stablespam.gating.gated_step`): a True leaves parameters and optimizer state as they were.
    """
    world = accelerator.num_processes
    global_targets = accelerator.reduce(sum(target_count(b) for b in micro_batches), reduction="sum")
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    last = len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        if is_fsdp(model):  # gradients stay unsharded and unreduced until the last micro-batch
            model.set_requires_gradient_sync(i == last)
        with contextlib.nullcontext() if i == last or is_fsdp(model) else accelerator.no_sync(model):
            micro_loss = token_loss_sum(model, batch)
            # DDP and FSDP2 average gradients over ranks, hence the world-size factor: the result is the
            # gradient of the token mean over the whole global batch.
            accelerator.backward(micro_loss * world / global_targets)
        loss_sum += micro_loss.detach().double()
    loss = accelerator.reduce(loss_sum, reduction="sum") / global_targets
    grad_norm = gradient_norm(model, accelerator, grad_clip)
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    skipped = None if skip_if is None else skip_if(loss, grad_norm)
    if skipped is None:
        optimizer.step()
    else:
        gated_step(optimizer, skipped)
    optimizer.zero_grad(set_to_none=True)
    return StepOutput(loss, grad_norm, global_targets, finite, skipped)


class RunningTotals:
    """What the loop logs, accumulated on the device between logging steps (no host sync).

    The window (loss sum, steps, real tokens) and the run totals (tokens seen, first non-finite
    step, skipped updates) are checkpointed, so a resumed run logs exactly what the uninterrupted
    one would. A skipped update is a step (its batch and schedule position are used up) whose loss
    stays out of the window mean.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.window_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.window_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.window_tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.tokens_seen = torch.zeros((), dtype=torch.int64, device=device)
        self.first_nonfinite_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.last_grad_norm = torch.zeros((), dtype=torch.float32, device=device)
        self.window_grad_norm_max = torch.zeros((), dtype=torch.float32, device=device)
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_steps, self.spike_skips, self.window_skipped = zero.clone(), zero.clone(), zero.clone()
        self.skip_run, self.longest_skip_run = zero.clone(), zero.clone()  # consecutive skipped updates
        self.last_skipped_step = torch.full((), -1, dtype=torch.int64, device=device)

    def add(self, out: StepOutput, step: int) -> None:
        """Account one step (`step`: its 1-based number); skipped updates still count their tokens."""
        self.tokens_seen += out.targets
        self.window_tokens += out.targets
        self.last_grad_norm.copy_(out.grad_norm)
        torch.maximum(self.window_grad_norm_max, out.grad_norm.float(), out=self.window_grad_norm_max)
        if out.skipped is None:
            self.window_loss += out.loss
            self.window_steps += 1
        else:
            skipped = out.skipped
            self.window_loss += torch.where(skipped, 0.0, out.loss)
            self.window_steps += ~skipped
            self.skipped_steps += skipped
            self.window_skipped += skipped
            self.spike_skips += skipped & out.finite  # a finite step is skipped only as a spike
            self.skip_run.copy_(torch.where(skipped, self.skip_run + 1, 0))
            torch.maximum(self.longest_skip_run, self.skip_run, out=self.longest_skip_run)
            self.last_skipped_step.copy_(torch.where(skipped, step, self.last_skipped_step))
        unseen = self.first_nonfinite_step < 0
        self.first_nonfinite_step.copy_(torch.where(~out.finite & unseen, step, self.first_nonfinite_step))

    def nonfinite_step(self) -> int | None:
        """The first step with a non-finite loss or gradient norm (one host sync), or None."""
        step = int(self.first_nonfinite_step)
        return step if step >= 0 else None

    def skip_runs(self) -> tuple[int, int]:
        """The longest run of consecutive skipped updates so far and the last skipped step (-1: none); syncs."""
        return int(self.longest_skip_run), int(self.last_skipped_step)

    def read_window(self) -> dict[str, float | int]:
        """The window's mean loss, its real tokens and the totals, then start a new window (syncs)."""
        steps = int(self.window_steps)
        values = {
            "loss": float(self.window_loss) / steps if steps else math.nan,
            "window_tokens": int(self.window_tokens),
            "tokens_seen": int(self.tokens_seen),
            "grad_norm": float(self.last_grad_norm),
            "grad_norm_max": float(self.window_grad_norm_max),
            "skipped_steps": int(self.skipped_steps),
            "spike_skips": int(self.spike_skips),
            "window_skipped": int(self.window_skipped),
            "last_skipped_step": int(self.last_skipped_step),
        }
        self.window_skipped.zero_()
        self.window_grad_norm_max.zero_()
        self.window_loss.zero_()
        self.window_steps.zero_()
        self.window_tokens.zero_()
        return values

    def state_dict(self) -> dict[str, Any]:
        return {k: v.cpu() for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            getattr(self, key).copy_(value)
