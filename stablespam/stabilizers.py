"""Composable stabilizers: AdaClip, AdaGN, SpikeClip, GSNorm and MoRet in front of any base optimizer.

`Stabilized(base, transforms=[AdaClip(), AdaGN()], moret=MoRet(1000))` rewrites every gradient with
the transforms (in order; the same functions `StableSPAM` runs) and then calls `base.step()`;
MoRet zeroes the base optimizer's state every `interval` steps *before* that step's update (the
corrected semantics of StableSPAM). So the paper's Table 3 (Lion + AdaGN + AdaClip, Adam-mini +
AdaGN + AdaClip) and Table 4 ablations (Adam + MoRet, + AdaClip, + AdaGN, SPAM's SpikeClip) are
configurations, and Adam + MoRet + AdaGN + AdaClip equals `StableSPAM(mode="corrected")` with no
beta1 cosine (tested). `GradientStabilizer(base)` (the ICML 2026 version of the Stable-SPAM paper,
shared/reference/gradient-stabilizer.md) is `Stabilized(base, [GSNorm()])`.

MoRet resets the base's per-parameter state generically: every floating-point tensor is zeroed and a
`step` counter is set to 0 (so the base's bias corrections restart at 1). Statistics of the
transforms are fp32 (fp64 for fp64 parameters) and never reset. Each transform keeps its own
per-tensor counter for their bias corrections, created at its first step, so a transform switched
on when a run resumes starts its statistics afresh instead of bias-correcting zeros as if they held
the whole run. The wrapper's step (MoRet's phase, SpikeClip's delay) is `group["stabilizer_step"]`.
On sharded (FSDP2) parameters the transforms rewrite the local shards of the gradients with the
whole tensor's statistics (sharding.py).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stablespam._state import evaluate_closure, restore_saved_dtypes
from stablespam.quantized_state import moment_tensor
from stablespam.sharding import local, shard_group
from stablespam.stable_spam import stat_dtype
from stablespam.transforms import adaclip_, adagn_, gradient_stabilize_, spike_clip_


@dataclass(frozen=True)
class AdaClip:
    """Adaptive spike clipping against an EMA (gamma3) of each tensor's max |g|."""

    gamma3: float = 0.999


@dataclass(frozen=True)
class AdaGN:
    """Adaptive gradient-norm scaling with norm EMAs gamma1 (first) and gamma2 (second moment)."""

    gamma1: float = 0.7
    gamma2: float = 0.9
    eps: float = 1e-8


@dataclass(frozen=True)
class SpikeClip:
    """SPAM's clipping g^2 <= threshold * v against the base's `exp_avg_sq`, off for `delay` steps
    after the start and after every momentum reset (v is near zero there)."""

    threshold: float = 5000.0
    delay: int = 20


@dataclass(frozen=True)
class GSNorm:
    """GradientStabilizer's transform: each tensor's gradient rescaled to m_hat / (sqrt(v_hat) + eps)
    of the EMAs (gamma1, gamma2) of its norm, direction kept; non-finite or zero norms are skipped."""

    gamma1: float = 0.6
    gamma2: float = 0.999
    eps: float = 1e-12
    bias_correction: bool = True

    def __post_init__(self) -> None:
        if not (0.0 <= self.gamma1 < 1.0 and 0.0 <= self.gamma2 < 1.0 and self.eps >= 0):
            raise ValueError(f"GSNorm needs gammas in [0, 1) and eps >= 0, got {self}")


@dataclass(frozen=True)
class MoRet:
    """Zero the base optimizer's state every `interval` steps (0 = never)."""

    interval: int = 1000


Transform = AdaClip | AdaGN | SpikeClip | GSNorm

# transforms with running statistics -> (their per-tensor Python counter, their statistics)
_STATISTICS: dict[type, tuple[str | None, tuple[str, ...]]] = {
    AdaClip: ("adaclip_step", ("max_ema",)),
    AdaGN: ("adagn_step", ("norm_ema", "norm_sq_ema")),
    GSNorm: (None, ("gs_norm_ema", "gs_norm_sq_ema", "gs_step", "gs_skipped")),
}
# GSNorm counts on the device (its counter advances only where a norm is finite and non-zero)
_DEVICE_COUNTERS = ("gs_step", "gs_skipped")


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero every floating-point state tensor and every quantized moment's codes (uint8) of
    `optimizer`, and set its `step` counters to 0."""
    for state in optimizer.state.values():
        for key, value in list(state.items()):
            if key == "step":
                if isinstance(value, torch.Tensor):
                    value.zero_()
                else:
                    state[key] = 0
            elif isinstance(value, torch.Tensor) and (value.is_floating_point() or value.dtype == torch.uint8):
                value.zero_()


class Stabilized(torch.optim.Optimizer):
    """Gradient transforms + momentum reset around a base optimizer, sharing its param groups."""

    def __init__(self, base: torch.optim.Optimizer, transforms: Sequence[Transform] = (),
                 moret: MoRet | None = None) -> None:
        self.base = base
        self.transforms = tuple(transforms)
        self.moret = moret
        for group in base.param_groups:
            group.setdefault("stabilizer_step", 0)
        super().__init__(base.param_groups, base.defaults)
        self.base.param_groups = self.param_groups

    def __repr__(self) -> str:
        return f"Stabilized({self.base!r}, transforms={self.transforms}, moret={self.moret})"

    def init_statistics(self, p: torch.Tensor) -> None:
        """Create the statistics (and counters at 0) of the transforms that `p` has none of yet."""
        state = self.state[p]
        for transform in self.transforms:
            counter, stats = _STATISTICS.get(type(transform), (None, ()))
            if stats and (counter or stats[0]) not in state:
                for key in stats:
                    dtype = torch.int64 if key in _DEVICE_COUNTERS else stat_dtype(p.dtype)
                    state[key] = torch.zeros((), dtype=dtype, device=p.device)
                if counter:
                    state[counter] = 0

    def _advance_counters(self, p: torch.Tensor) -> tuple[int | torch.Tensor | None, ...]:
        """Each transform's step count for `p` after this step (None where it keeps no counter of its
        own; a device tensor after a gated step, see gating.py)."""
        self.init_statistics(p)
        state = self.state[p]
        counts: list[int | torch.Tensor | None] = []
        for transform in self.transforms:
            counter = _STATISTICS.get(type(transform), (None, ()))[0]
            if counter:
                state[counter] += 1
            counts.append(state[counter] if counter else None)
        return tuple(counts)

    def skipped_tensors(self) -> torch.Tensor:
        """How many tensor gradients GSNorm left alone (non-finite or zero norm), as a device tensor."""
        counts = [s["gs_skipped"] for s in self.state.values() if "gs_skipped" in s]
        return torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.int64)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate_closure(closure)
        reset = False
        for group in self.param_groups:
            group["stabilizer_step"] += 1
            t = group["stabilizer_step"]
            reset = reset or bool(self.moret and self.moret.interval > 0 and t % self.moret.interval == 0)
            params = [p for p in group["params"] if p.grad is not None]
            if params and self.transforms:
                self._transform_group(params, t)
        if reset:
            reset_optimizer_state(self.base)
        self.base.step()
        return loss

    def _transform_group(self, params: list[torch.Tensor], t: int) -> None:
        buckets: dict[tuple[Any, ...], list[torch.Tensor]] = defaultdict(list)
        for p in params:
            buckets[(p.device, p.dtype, self._advance_counters(p))].append(p)
        for (_, _, counts), bucket in buckets.items():
            grads = [local(p.grad) for p in bucket]
            states = [self.state[p] for p in bucket]
            group = shard_group(bucket)
            for transform, k in zip(self.transforms, counts):
                if isinstance(transform, AdaClip):
                    max_ema = torch.stack([s["max_ema"] for s in states])
                    adaclip_(grads, max_ema, transform.gamma3, 1.0 - transform.gamma3**k, group=group)
                    torch._foreach_copy_([s["max_ema"] for s in states], list(max_ema.unbind(0)))
                elif isinstance(transform, AdaGN):
                    norm_ema = torch.stack([s["norm_ema"] for s in states])
                    norm_sq_ema = torch.stack([s["norm_sq_ema"] for s in states])
                    adagn_(grads, norm_ema, norm_sq_ema, transform.gamma1, transform.gamma2,
                           1.0 - transform.gamma1**k, 1.0 - transform.gamma2**k, transform.eps, group)
                    torch._foreach_copy_([s["norm_ema"] for s in states], list(norm_ema.unbind(0)))
                    torch._foreach_copy_([s["norm_sq_ema"] for s in states], list(norm_sq_ema.unbind(0)))
                elif isinstance(transform, GSNorm):
                    keys = _STATISTICS[GSNorm][1]
                    vectors = [torch.stack([s[key] for s in states]) for key in keys]
                    gradient_stabilize_(grads, *vectors, transform.gamma1, transform.gamma2, transform.eps,
                                        transform.bias_correction, group)
                    for key, vector in zip(keys, vectors):
                        torch._foreach_copy_([s[key] for s in states], list(vector.unbind(0)))
                else:
                    self._spike_clip(bucket, grads, transform, t)

    def _spike_clip(self, params: list[torch.Tensor], grads: list[torch.Tensor], clip: SpikeClip,
                    t: int) -> None:
        interval = self.moret.interval if self.moret else 0
        if clip.threshold == 0 or t < clip.delay or (interval > 0 and t % interval < clip.delay):
            return
        # before the base's first step there is no second moment yet: nothing to clip against
        started = [(g, self.base.state[p]) for p, g in zip(params, grads) if self.base.state[p]]
        if any("exp_avg_sq" not in state and "exp_avg_sq_codes" not in state for _, state in started):
            raise ValueError(
                f"SpikeClip needs a base optimizer with an 'exp_avg_sq' second moment; "
                f"{type(self.base).__name__} has none"
            )
        for grad, state in started:  # one tensor at a time: a quantized second moment is dequantized
            spike_clip_([grad], [local(moment_tensor(state, "exp_avg_sq", grad.shape))], clip.threshold)

    def state_dict(self) -> dict[str, Any]:
        state_dict = self.base.state_dict()
        state_dict["stabilizer_state"] = super().state_dict()["state"]
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)
        own = {"state": state_dict["stabilizer_state"], "param_groups": state_dict["param_groups"]}
        super().load_state_dict(own)
        restore_saved_dtypes(self, own)
        self.base.param_groups = self.param_groups


class GradientStabilizer(Stabilized):
    """GradientStabilizer (ICML 2026; the published GSWrapper's semantics) around any base optimizer.

    Before each `base.step()`, every tensor's gradient keeps its direction and takes the norm
    m_hat / (sqrt(v_hat) + eps) of the EMAs (gamma1, gamma2) of its past norms, so it is never above
    1; a tensor with a non-finite or zero norm is left alone and counted (`skipped_tensors()`).
    Shares the base's param groups; `state_dict()` carries the base's state and the statistics.
    """

    def __init__(self, base: torch.optim.Optimizer, gamma1: float = 0.6, gamma2: float = 0.999,
                 eps: float = 1e-12, bias_correction: bool = True) -> None:
        super().__init__(base, [GSNorm(gamma1, gamma2, eps, bias_correction)])

    def __repr__(self) -> str:
        return f"GradientStabilizer({self.base!r}, {self.transforms[0]})"
