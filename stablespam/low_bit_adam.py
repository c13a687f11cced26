"""Adam / AdamW with 8- or 4-bit block-wise moments (`optimizer=adam|adamw optimizer.state_bits=8|4`).

Why not torchao's AdamW8bit / AdamW4bit: torchao is an optional dependency here, it compiles one
single-tensor step per parameter shape (a C++ toolchain and minutes of compilation on CPU), and its
states are tensor subclasses. This class uses the quantized moments of `quantized_state.py`, the
same codes and maps as StableSPAM and SPAM, and torch's foreach Adam op sequence (`adam_update_`), so
with `state_bits=32` it is `torch.optim.Adam/AdamW(foreach=True)` bit for bit (tested). The factory
builds torch's classes for 32 bits and this one for 8 and 4. Its state layout is torch Adam's
(`step` a 0-dim fp32 CPU tensor per parameter, moments under `exp_avg` / `exp_avg_sq`, or as
`<key>_codes` / `<key>_scale`), so a resume can move between the two (resume.py converts the moments).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

from stablespam._state import GroupwiseOptimizer
from stablespam.quantized_state import MOMENTS, STATE_BITS, DequantizedMoment, init_moments, moment_chunks
from stablespam.stable_spam import adam_update_


class LowBitAdam(GroupwiseOptimizer):
    """Adam (`decoupled_weight_decay=False`, L2 added to the gradient) or AdamW with `state_bits` moments."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        state_bits: int = 8,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if state_bits not in STATE_BITS:
            raise ValueError(f"state_bits must be one of {STATE_BITS}, got {state_bits}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, state_bits=state_bits)
        super().__init__(params, defaults)

    def _step_group(self, group: dict[str, Any]) -> None:
        bits = group["state_bits"]
        buckets: dict[tuple[Any, ...], list[torch.Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("LowBitAdam does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                init_moments(state, p.shape, p.device, bits, p.dtype)
            state["step"] += 1  # a CPU tensor, as in torch's foreach Adam: reading it is no device sync
            buckets[(p.device, p.dtype, int(state["step"].item()))].append(p)
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        for (_, _, k), params in buckets.items():
            grads = [p.grad for p in params]
            if wd != 0 and group["decoupled_weight_decay"]:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            elif wd != 0:
                grads = torch._foreach_add(grads, params, alpha=wd)
            states = [self.state[p] for p in params]
            for chunk in moment_chunks([p.numel() for p in params], bits):
                shapes = [params[i].shape for i in chunk]
                moments = [DequantizedMoment([states[i] for i in chunk], key, shapes, bits, signed)
                           for key, signed in MOMENTS]
                adam_update_([params[i] for i in chunk], [grads[i] for i in chunk], moments[0].tensors,
                             moments[1].tensors, beta1, beta2, group["eps"], -lr / (1.0 - beta1**k),
                             (1.0 - beta2**k) ** 0.5)
                for moment in moments:
                    moment.store()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():  # a checkpoint of fused Adam, or one loaded onto a GPU
            if "step" in state:
                state["step"] = state["step"].to("cpu", torch.float32)
