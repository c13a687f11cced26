"""Data parallelism of a run: `trainer.parallelism=ddp` (accelerate's DDP, every rank holds the whole
model) or `fsdp2` (`torch.distributed.fsdp.fully_shard`: parameters, gradients and optimizer state
sharded on dim 0 across the ranks as DTensors).

FSDP2 is applied after the quantization converter (QuantLinear shares the Parameters it replaces)
and before the optimizer is built, so the optimizer holds the sharded DTensors; the optimizers
reduce their per-tensor statistics over the shards (stablespam/sharding.py).
"""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def shard_model(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm, lm_head).

    `bf16_mixed`: fp32 sharded master weights, gathered and computed in bf16, gradients
    reduce-scattered in fp32. `fp32` / `pure_bf16`: the parameters' own dtype throughout.
    """
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16_mixed" else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_fsdp(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def export_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights of a sharded model, on CPU, for `save_pretrained` (collective: every rank
    calls it; rank 0 receives the weights)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
