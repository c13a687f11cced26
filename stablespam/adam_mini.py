"""Adam-mini (arXiv 2406.16793): one second-moment value per block, blocks chosen by module role.

Our own rather than the `adam-mini` package (which the tests use as the reference): the package
takes its world size from `torch.cuda.device_count()` instead of the process group (wrong under
FSDP, its issue #42), breaks with CPU offload, and keeps state in the parameter dtype. Here every
state tensor is fp32, and roles are matched by name suffix/pattern like the package:
- q/k projections: one value per attention head (rows of hidden*hidden/n_heads elements);
- v/o projections, MLP, embedding, lm_head: one value per output row;
- biases: plain Adam; everything else (norms): one value per tensor.
Under DDP every rank holds full gradients, so no reduction is needed; sharded DTensor parameters
are refused (a per-shard mean is not the per-block mean).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from stablespam._state import evaluate_closure, refuse_sharded, restore_saved_dtypes

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


class AdamMini(torch.optim.Optimizer):
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

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p, role in zip(group["params"], group["roles"]):
                if p.grad is None:
                    continue
                refuse_sharded([p], "AdamMini")
                grad = p.grad.float()
                blocks = self._blocks(grad, role, group["head_numel"])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(blocks)
                    state["vmean"] = torch.zeros_like(blocks) if role == "adam" else (
                        torch.zeros(blocks.shape[0], 1, device=p.device) if blocks.dim() == 2
                        else torch.zeros((), device=p.device))
                second = blocks * blocks if role == "adam" else (
                    (blocks * blocks).mean(dim=1, keepdim=True) if blocks.dim() == 2
                    else (blocks * blocks).sum() / blocks.numel())
                state["vmean"].mul_(beta2).add_(second, alpha=1.0 - beta2)
                state["step"] += 1
                if wd > 0:
                    p.mul_(1.0 - lr * wd)
                state["exp_avg"].lerp_(blocks, 1.0 - beta1)
                k = state["step"]
                h = (state["vmean"].sqrt() / (1.0 - beta2**k) ** 0.5).add_(eps)
                update = state["exp_avg"] * ((1.0 / (1.0 - beta1**k)) / h) * lr
                p.sub_(update.view(p.shape).to(p.dtype))
        return loss

    @staticmethod
    def _blocks(grad: torch.Tensor, role: str, head_numel: int) -> torch.Tensor:
        if role == "head":
            return grad.reshape(-1, head_numel)
        if role == "row" and grad.dim() >= 2:
            return grad.reshape(grad.shape[0], -1)
        if role == "adam" or role == "row":
            return grad
        return grad.reshape(-1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restore_saved_dtypes(self, state_dict)
