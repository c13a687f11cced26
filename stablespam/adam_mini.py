"""Adam-mini (arXiv 2406.16793): one second-moment value per block, blocks chosen by module role.

Our own rather than the `adam-mini` package (which the tests use as the reference): the package
takes its world size from `torch.cuda.device_count()` instead of the process group (wrong under
FSDP, its issue #42), breaks with CPU offload, and keeps state in the parameter dtype. Here every
state tensor is fp32, and roles are matched by name suffix/pattern like the package:
- q/k projections: one value per attention head (rows of hidden*hidden/n_heads elements);
- v/o projections, MLP, embedding, lm_head: one value per output row;
- biases: plain Adam; everything else (norms): one value per tensor.
Under DDP every rank holds full gradients, so no reduction is needed; for sharded (FSDP2) DTensor
parameters the shards' per-block sums of g^2 are all-reduced (one call per param group), so blocks
that straddle shard boundaries get the whole block's mean (sharding.py).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from stablespam._state import GroupwiseOptimizer
from stablespam.sharding import (
    all_reduce_sum_,
    block_sums,
    expand_blocks,
    flat_offset,
    is_sharded,
    local,
    shard_group,
)

_EMBED = ("embed", "embd", "wte")
_OUTPUT = ("lm_head", "output", "final_layer")
_QK = ("k_proj", "q_proj", "wq", "wk", "query", "key")
_V = ("v_proj", "wv", "value")
_ATTN_OUT = ("o_proj", "wo", "attn.proj")
_MLP = ("feed_forward", "linear", "mlp")


def adam_mini_role(name: str) -> str:
    """'adam' (biases), 'head' (q/k), 'row' (v/o/MLP/embedding/lm_head) or 'tensor' (the rest)."""
    name = name.lower()
    if "bias" in name:
        return "adam"
    if any(k in name for k in _QK):
        return "head"
    if any(k in name for k in _EMBED + _OUTPUT + _V + _MLP + _ATTN_OUT):
        return "row"
    return "tensor"


def _no_weight_decay(name: str) -> bool:
    name = name.lower()
    return "norm" in name or "ln" in name or "bias" in name


class AdamMini(GroupwiseOptimizer):
    """Adam-mini over `named_parameters`; `dim`/`n_heads` give the q/k head size dim*dim/n_heads."""

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if (dim * dim) % n_heads:
            raise ValueError(f"dim*dim={dim * dim} is not divisible by n_heads={n_heads}")
        if n_kv_heads is not None and n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        groups: dict[bool, dict[str, Any]] = {}
        for name, p in named_parameters:
            if not p.requires_grad:
                continue
            no_decay = _no_weight_decay(name)
            group = groups.setdefault(no_decay, {"params": [], "roles": [],
                                                 "weight_decay": 0.0 if no_decay else weight_decay})
            group["params"].append(p)
            group["roles"].append(adam_mini_role(name))
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        head_numel=dim * dim // n_heads)
        super().__init__([groups[k] for k in sorted(groups)], defaults)

    def _step_group(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        live = [(p, role) for p, role in zip(group["params"], group["roles"]) if p.grad is not None]
        seconds = [self._second_moment(p, role, group["head_numel"]) for p, role in live]
        # sharded parameters: the shards' per-block sums of g^2, completed in one all_reduce
        partial = [i for i, (p, role) in enumerate(live)
                   if is_sharded(p) and self._block(p, role, group["head_numel"])]
        if partial:
            sums = all_reduce_sum_(torch.cat([seconds[i].reshape(-1) for i in partial]),
                                   shard_group(live[i][0] for i in partial))
            for i, total in zip(partial, sums.split([seconds[i].numel() for i in partial])):
                p, role = live[i]
                seconds[i] = (total / self._block(p, role, group["head_numel"])).view_as(seconds[i])
        for (p, role), second in zip(live, seconds):
            state = self.state[p]
            if not state:
                self._init_state(p, role, group["head_numel"], second)
            local(state["vmean"]).mul_(beta2).add_(second, alpha=1.0 - beta2)
            state["step"] += 1
            if wd > 0:
                local(p).mul_(1.0 - lr * wd)
            exp_avg = local(state["exp_avg"])
            grad = local(p.grad).float()
            exp_avg.lerp_(self._blocks(grad, role, group["head_numel"]) if not is_sharded(p) else grad, 1.0 - beta1)
            k = state["step"]
            h = (local(state["vmean"]).sqrt() / (1.0 - beta2**k) ** 0.5).add_(eps)
            block = self._block(p, role, group["head_numel"]) if is_sharded(p) else 0
            if block:  # one value per block of the whole tensor, spread over the shard's entries
                h = expand_blocks(h, flat_offset(p), block, grad.numel()).view_as(grad)
            update = exp_avg * ((1.0 / (1.0 - beta1**k)) / h) * lr
            local(p).sub_(update.view(local(p).shape).to(p.dtype))

    def _second_moment(self, p: torch.Tensor, role: str, head_numel: int) -> torch.Tensor:
        """g^2 per entry (Adam roles), else its mean per block; for a sharded parameter the shard's
        per-block sums (all blocks of the whole tensor), which `_step_group` reduces."""
        grad = local(p.grad).float()
        block = self._block(p, role, head_numel)
        if is_sharded(p) and block:
            per_row = role == "head" or (role == "row" and p.dim() >= 2)
            return block_sums(grad * grad, flat_offset(p), block, p.numel() // block).view((-1, 1) if per_row else ())
        blocks = self._blocks(grad, role, head_numel)
        if not block:
            return blocks * blocks
        squares = blocks * blocks
        return squares.mean(dim=1, keepdim=True) if blocks.dim() == 2 else squares.sum() / blocks.numel()

    def _init_state(self, p: torch.Tensor, role: str, head_numel: int, second: torch.Tensor) -> None:
        """fp32 moments: `exp_avg` shaped as the blocks (unsharded) or a DTensor like `p` (sharded);
        `vmean` like `second`: per entry (Adam roles; a DTensor when sharded) or per block of the whole tensor."""
        state = self.state[p]
        state["step"] = 0
        sharded = is_sharded(p)
        state["exp_avg"] = (torch.zeros_like(p, dtype=torch.float32) if sharded
                            else torch.zeros_like(self._blocks(p.grad.float(), role, head_numel)))
        elementwise = not self._block(p, role, head_numel)
        state["vmean"] = (torch.zeros_like(p, dtype=torch.float32) if sharded and elementwise
                          else torch.zeros_like(second))

    @staticmethod
    def _block(p: torch.Tensor, role: str, head_numel: int) -> int:
        """Entries per second-moment block of the whole tensor; 0 for the per-entry (Adam) role."""
        if role == "adam":
            return 0
        if role == "head":
            return head_numel
        if role == "row" and p.dim() >= 2:
            return p.numel() // p.shape[0]
        return p.numel()

    @staticmethod
    def _blocks(grad: torch.Tensor, role: str, head_numel: int) -> torch.Tensor:
        if role == "head":
            return grad.reshape(-1, head_numel)
        if role == "row" and grad.dim() >= 2:
            return grad.reshape(grad.shape[0], -1)
        if role == "adam" or role == "row":
            return grad
        return grad.reshape(-1)
