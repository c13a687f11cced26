"""Block-wise 8- and 4-bit Adam moments (`state_bits`), shared by StableSPAM, SPAM and LowBitAdam.

Scheme (Dettmers et al., arXiv 2110.02861; at 4 bits Li et al., arXiv 2309.01507), with the code maps
and block sizes of torchao's AdamW8bit / AdamW4bit, so that torchao is an oracle for the tests (one
deliberate difference, the second moment's zero code, below):
- a moment is flattened, zero-padded to whole blocks (256 entries at 8 bits, 128 at 4) and each block
  keeps its absmax s in fp32 (`<key>_scale`) and one code per entry (`<key>_codes`, uint8; at 4 bits
  two codes per byte, the first entry in the high nibble). An entry x is stored as the code of the
  map value nearest to x / s and read back as map[code] * s; a block of zeros has s = 0 and reads
  back as exact zeros, so a momentum reset just zeroes codes and scales.
- maps: the first moment uses the signed dynamic map, the second the unsigned one (one more
  fraction bit instead of the sign). A second moment never reads back as 0 unless its block is zero:
  m / (sqrt(0) + eps) explodes (the "zero-point problem" of arXiv 2309.01507). At 4 bits its map is
  linear, 1/16 .. 16/16, without zero (torchao's); at 8 bits a v is rounded to the nearest *positive*
  value of the unsigned dynamic map (`min_code=1`), where torchao and bitsandbytes round v under
  1.6e-7 of the block's absmax to 0. After a momentum reset (m = 0.1 g, v = 0.001 g^2) that zero code
  made the quickstart's gradient norm jump to 230 (docs/optimizers.md).
- tensors under 4096 entries (norm weights, biases) keep fp32 moments, as in bitsandbytes and torchao.

Why our own code: torchao is only an optional dependency here, and its optimizers keep each moment
as a tensor subclass updated by a single-tensor `torch.compile`d step per parameter (one compilation
per shape, a C++ toolchain on CPU). Stable-SPAM and SPAM need the moments inside their own
multi-tensor step, where the stabilizers run over all tensors at once. bitsandbytes is no dependency
and GPU-oriented.

The step runs over chunks of tensors of at most `CHUNK_NUMEL` entries (`moment_chunks`): a chunk's
codes are concatenated and dequantized in one pass into one fp32 buffer (`DequantizedMoment`), the
optimizer's foreach ops update per-tensor views of it, and `store()` re-quantizes it in one pass.
So the transient fp32 memory is one chunk's, not the model's, and kernels launch per chunk, not
per tensor. Nothing is read back to the host.

Rounding to the nearest code uses a table over the top bits of the float32 pattern (sign, exponent,
`_CELL_BITS` mantissa bits): it holds how many midpoints lie below each cell, and one comparison
with the next midpoint finishes it. Each cell holds at most one midpoint (checked when the table is
built), so this equals `torch.bucketize(y, midpoints, right=True)` exactly (tested) and on CPU runs
about 4.5x faster than it (measured on 4M entries: 83 vs 384 ms).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

# (state key, signed map): Adam's first and second moment
MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))
STATE_BITS = (32, 8, 4)
BLOCK_SIZE = {8: 256, 4: 128}
MIN_QUANTIZED_NUMEL = 4096
CHUNK_NUMEL = 1 << 23
_CELL_BITS = 8
_TINY = torch.finfo(torch.float32).tiny


def codes_key(key: str) -> str:
    return f"{key}_codes"


def scale_key(key: str) -> str:
    return f"{key}_scale"


def dynamic_map(bits: int, signed: bool) -> list[float]:
    """Dettmers' dynamic map of 2^bits sorted values in [-1, 1] (bitsandbytes' without its zero padding).

    Exponent e = 0 .. bits-2 selects the decade [10^(e-bits+1), 10^(e-bits+2)]; it holds 2^e values
    (2^(e+1) for unsigned maps, which spend the sign bit on the fraction): the midpoints of equal
    steps of [0.1, 1] times 10^(e-bits+2). Plus 0 and 1.
    """
    exponents = bits - 1
    values = [0.0, 1.0]
    for e in range(exponents):
        steps = 2 ** (e if signed else e + 1)
        decade = 10.0 ** (e - exponents + 1)
        for j in range(steps):
            v = decade * (0.1 + 0.9 * (j + 0.5) / steps)
            values += [v, -v] if signed else [v]
    return sorted(values)


@dataclass(frozen=True)
class CodeMap:
    """2^bits sorted values; an entry x of a block with absmax s is stored as the code of the value nearest x / s,
    and never as a code below `min_code`."""

    bits: int
    values: tuple[float, ...]
    min_code: int = 0

    @property
    def block_size(self) -> int:
        return BLOCK_SIZE[self.bits]


@lru_cache(maxsize=None)
def moment_map(bits: int, signed: bool) -> CodeMap:
    """The map of the first (signed) or second (unsigned) moment at 8 or 4 bits; see the module docstring."""
    if bits == 4 and not signed:
        return CodeMap(4, tuple((i + 1) / 16 for i in range(16)))
    return CodeMap(bits, tuple(dynamic_map(bits, signed)), min_code=0 if signed else 1)


def _cell_counts(midpoints: np.ndarray) -> np.ndarray:
    """For each cell of float32 patterns that share their top 9 + _CELL_BITS bits, how many midpoints
    are <= the cell's smallest value."""
    shift = 23 - _CELL_BITS
    first = np.arange(1 << (9 + _CELL_BITS), dtype=np.uint32) << np.uint32(shift)
    ends = np.stack([first, first | np.uint32((1 << shift) - 1)]).view(np.float32)
    with np.errstate(invalid="ignore"):
        lowest, highest = np.nan_to_num(ends.min(axis=0)), np.nan_to_num(ends.max(axis=0))
    below = np.searchsorted(midpoints, lowest, side="right")
    if (np.searchsorted(midpoints, highest, side="right") - below).max() > 1:
        raise ValueError(f"a lookup cell of {_CELL_BITS} mantissa bits holds two midpoints of the map")
    return below.astype(np.int32)


@lru_cache(maxsize=None)
def _tables(cmap: CodeMap, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(map values, midpoints followed by +inf, cell counts) on `device`."""
    values = np.asarray(cmap.values, dtype=np.float32)
    midpoints = (values[1:] + values[:-1]) / np.float32(2)
    cells = _cell_counts(midpoints)
    midpoints = np.append(midpoints, np.float32(np.inf))
    return tuple(torch.from_numpy(a).to(device) for a in (values, midpoints, cells))  # type: ignore[return-value]


def nearest_codes(y: torch.Tensor, cmap: CodeMap) -> torch.Tensor:
    """int32 index of the map value nearest to each entry of the flat fp32 `y` (ties go up), at least
    `cmap.min_code`."""
    _, midpoints, cells = _tables(cmap, y.device)
    index = (y.view(torch.int32) >> (23 - _CELL_BITS)).bitwise_and_((1 << (9 + _CELL_BITS)) - 1)
    codes = cells.index_select(0, index)
    codes.add_(y >= midpoints.index_select(0, codes))
    return codes.clamp_min_(cmap.min_code) if cmap.min_code else codes


def quantize(x: torch.Tensor, cmap: CodeMap) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, fp32 block absmax) of the flat fp32 `x` of whole blocks; overwrites `x`."""
    blocks = x.view(-1, cmap.block_size)
    scale = blocks.abs().amax(dim=1)
    codes = nearest_codes(blocks.div_(scale.clamp_min(_TINY).unsqueeze(1)).view(-1), cmap)
    if cmap.bits == 4:
        pairs = codes.view(-1, 2)
        codes = pairs[:, 0].bitwise_left_shift(4).bitwise_or_(pairs[:, 1])
    return codes.to(torch.uint8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, cmap: CodeMap) -> torch.Tensor:
    """Flat fp32 values of `codes` (whole blocks) with block absmax `scale`."""
    index = codes.int()
    if cmap.bits == 4:
        index = torch.stack([index.bitwise_right_shift(4), index.bitwise_and(15)], dim=-1).view(-1)
    values = _tables(cmap, codes.device)[0].index_select(0, index)
    return values.view(-1, cmap.block_size).mul_(scale.unsqueeze(1)).view(-1)


def padded(numel: int, bits: int) -> int:
    block = BLOCK_SIZE[bits]
    return -(-numel // block) * block


def quantized(numel: int, bits: int) -> bool:
    """Whether a moment of `numel` entries is stored as codes under `state_bits=bits`."""
    return bits < 32 and numel >= MIN_QUANTIZED_NUMEL


def init_moments(state: dict[str, Any], shape: torch.Size, device: torch.device, bits: int,
                 dtype: torch.dtype) -> None:
    """Zero moments of `shape` in `state`: codes and scales, or float tensors (`dtype` at 32 bits, else fp32)."""
    numel = shape.numel()
    for key, _ in MOMENTS:
        if quantized(numel, bits):
            blocks = padded(numel, bits) // BLOCK_SIZE[bits]
            state[codes_key(key)] = torch.zeros(blocks * BLOCK_SIZE[bits] * bits // 8, dtype=torch.uint8,
                                                device=device)
            state[scale_key(key)] = torch.zeros(blocks, dtype=torch.float32, device=device)
        else:
            state[key] = torch.zeros(shape, dtype=dtype if bits == 32 else torch.float32, device=device)


def zero_moments_(states: Sequence[dict[str, Any]]) -> None:
    """Momentum reset: zero both moments, i.e. their codes and scales where they are quantized."""
    keys = [k for key, _ in MOMENTS for k in (key, codes_key(key), scale_key(key))]
    torch._foreach_zero_([s[k] for s in states for k in keys if k in s])


def moment_chunks(numels: Sequence[int], bits: int) -> list[range]:
    """Consecutive index ranges of tensors holding together at most CHUNK_NUMEL entries (or one larger
    tensor); a single range at 32 bits, where nothing is dequantized."""
    if bits == 32:
        return [range(len(numels))] if numels else []
    chunks, start, total = [], 0, 0
    for i, n in enumerate(numels):
        if total and total + n > CHUNK_NUMEL:
            chunks.append(range(start, i))
            start, total = i, 0
        total += n
    if start < len(numels):
        chunks.append(range(start, len(numels)))
    return chunks


class DequantizedMoment:
    """One moment of a chunk of tensors as float tensors to update in place (`tensors`).

    Stored float moments are handed out as they are; quantized ones are views into one fp32 buffer
    dequantized from all their codes at once, and `store()` writes that buffer back as codes.
    """

    def __init__(self, states: Sequence[dict[str, Any]], key: str, shapes: Sequence[torch.Size], bits: int,
                 signed: bool) -> None:
        self.states, self.key = states, key
        self.quantized = [i for i, s in enumerate(states) if codes_key(key) in s]
        self.tensors: list[torch.Tensor] = [s.get(key) for s in states]  # type: ignore[misc]
        if not self.quantized:
            return
        self.cmap = moment_map(bits, signed)
        self.buffer = dequantize(torch.cat([states[i][codes_key(key)] for i in self.quantized]),
                                 torch.cat([states[i][scale_key(key)] for i in self.quantized]), self.cmap)
        sizes = [padded(shapes[i].numel(), bits) for i in self.quantized]
        for i, part in zip(self.quantized, self.buffer.split(sizes)):
            numel = shapes[i].numel()
            part[numel:].zero_()  # padding stays zero, so it never becomes a block's absmax
            self.tensors[i] = part[:numel].view(shapes[i])

    def store(self) -> None:
        """Re-quantize the updated buffer into the states' codes and scales (consumes the buffer)."""
        if not self.quantized:
            return
        codes, scale = quantize(self.buffer, self.cmap)
        targets = [(self.states[i][codes_key(self.key)], self.states[i][scale_key(self.key)])
                   for i in self.quantized]
        torch._foreach_copy_([c for c, _ in targets], list(codes.split([c.numel() for c, _ in targets])))
        torch._foreach_copy_([s for _, s in targets], list(scale.split([s.numel() for _, s in targets])))


def stored_bits(state: dict[str, Any], key: str, numel: int) -> int:
    """32 for a float moment, else 8 or 4, told apart by the number of blocks."""
    if codes_key(key) not in state:
        return 32
    return 8 if state[scale_key(key)].numel() == padded(numel, 8) // BLOCK_SIZE[8] else 4


def moment_tensor(state: dict[str, Any], key: str, shape: torch.Size) -> torch.Tensor:
    """Moment `key` of one state as a float tensor of `shape` (dequantized if stored as codes)."""
    bits = stored_bits(state, key, shape.numel())
    if bits == 32:
        return state[key]
    cmap = moment_map(bits, dict(MOMENTS)[key])
    return dequantize(state[codes_key(key)], state[scale_key(key)], cmap)[: shape.numel()].view(shape)


def convert_moments(state: dict[str, Any], bits: int, shape: torch.Size, dtype: torch.dtype) -> None:
    """Re-store both moments of one parameter for `state_bits=bits` (`dtype` for float moments at 32).

    A resume under another `optimizer.state_bits`: codes are dequantized, float moments quantized
    (rounded like a step's re-quantization), and moments already stored as `bits` are left untouched.
    """
    numel = shape.numel()
    for key, signed in MOMENTS:
        have = stored_bits(state, key, numel)
        if have == 32 and key not in state:
            continue
        if have == bits and have < 32:
            continue
        value = moment_tensor(state, key, shape)
        for stale in (key, codes_key(key), scale_key(key)):
            state.pop(stale, None)
        if quantized(numel, bits):
            flat = torch.zeros(padded(numel, bits), dtype=torch.float32, device=value.device)
            flat[:numel] = value.reshape(-1)
            state[codes_key(key)], state[scale_key(key)] = quantize(flat, moment_map(bits, signed))
        else:
            state[key] = value.to(dtype if bits == 32 else torch.float32)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (state-dict-like) nest of dicts, lists and tuples; a tensor subclass
    (torchao's quantized states) counts its inner tensors."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, name)) for name in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
