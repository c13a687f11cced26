"""Whole-tensor statistics for parameters sharded as DTensors (FSDP2's `fully_shard`).

FSDP2 shards every parameter on dim 0 across a process group. The optimizers compute on the local
shards (`local`), and where an update depends on a statistic of the whole tensor (AdaClip's max |g|,
AdaGN / GSNorm's ||g||, Adam-mini's per-block means) they reduce the per-shard partial statistics of
all the bucket's tensors in one `all_reduce` per statistic kind, so a sharded run computes what the
unsharded one does. Plain tensors (DDP: every rank holds the whole tensor) need no reduction: every
helper is then a no-op and `shard_group` returns None.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # torch built without distributed support: nothing is ever sharded
    DTensor = ()  # type: ignore[assignment,misc]


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place ops write through), or `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def locals_(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [local(t) for t in tensors]


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor) and any(p.is_shard() for p in t.placements)


def _group(p: torch.Tensor) -> dist.ProcessGroup | None:
    if not is_sharded(p):
        return None
    dims = [i for i, placement in enumerate(p.placements) if placement.is_shard()]
    if len(dims) != 1 or p.placements[dims[0]].dim != 0:
        raise NotImplementedError(f"parameters sharded as {p.placements}: only dim-0 sharding on one mesh "
                                  f"dimension (FSDP2's) has whole-tensor statistics here")
    return p.device_mesh.get_group(dims[0])


def shard_group(params: Iterable[torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group the tensors are sharded over (None: unsharded); one group for all of them."""
    groups = {_group(p) for p in params}
    if len(groups) > 1:
        raise NotImplementedError("a bucket mixes sharded and unsharded parameters (or several meshes)")
    return groups.pop() if groups else None


def all_reduce_max_(values: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return values


def all_reduce_sum_(values: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def flat_offset(p: torch.Tensor) -> int:
    """Index, in the whole tensor flattened, of the local shard's first entry (0 when unsharded).

    A dim-0 shard of a row-major tensor is one contiguous range of the flattened whole tensor.
    """
    if not is_sharded(p):
        return 0
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0] * math.prod(p.shape[1:])


def block_sums(values: torch.Tensor, offset: int, block: int, n_blocks: int) -> torch.Tensor:
    """Sums of `values` (a shard's flattened entries starting at `offset` of the whole tensor) per
    block of `block` consecutive entries of the whole tensor: a vector of all `n_blocks`, zero for
    the blocks the shard does not touch, so summing it over the shards gives the whole tensor's.

    Blocks may straddle shard boundaries (an attention head split between two ranks): the shard is
    padded with zeros to whole blocks, which adds nothing to any sum.
    """
    flat = values.reshape(-1)
    lead = offset % block
    first = offset // block
    padded = torch.nn.functional.pad(flat, (lead, -(lead + flat.numel()) % block))
    sums = padded.view(-1, block).sum(dim=1)
    out = torch.zeros(n_blocks, dtype=sums.dtype, device=sums.device)
    out[first:first + sums.numel()] = sums
    return out


def expand_blocks(values: torch.Tensor, offset: int, block: int, numel: int) -> torch.Tensor:
    """The inverse view of `block_sums`: one value per block of the whole tensor, repeated over the
    `numel` entries of the shard that starts at flat index `offset`."""
    lead = offset % block
    first = offset // block
    count = -(-(lead + numel) // block)
    spread = values.reshape(-1)[first:first + count].repeat_interleave(block)
    return spread[lead:lead + numel]


def dense_mask(p: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """A bool DTensor like the sharded `p`, True at the flat `indices` of the whole tensor, each rank
    holding its shard: SPAM's sparse-momentum mask drawn for the whole tensor, sliced to the shard."""
    full = torch.zeros(p.numel(), dtype=torch.bool, device=indices.device)
    full[indices] = True
    shard = local(p)
    start = flat_offset(p)
    mine = full[start:start + shard.numel()].view(shard.shape).to(shard.device)
    return DTensor.from_local(mine, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def sharded_like(p: torch.Tensor, shard: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`shard` (this rank's rows) as a DTensor of the whole `shape`, sharded like `p` on dim 0:
    per-row optimizer state that DCP can save and reshard."""
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(shard, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)
