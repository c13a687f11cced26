"""Pure-PyTorch fake quantization: quantize to a low-precision grid and return the dequantized
values in the input's dtype.

Written here rather than taken from a library because none covers the set we need in one
differentiable-friendly, CPU-and-GPU, torch.compile-traceable function: torchao's QAT quantizers
have integers only (no FP4, stochastic rounding or outliers), its MX/NVFP4 code targets real
kernels, and the official Stable-SPAM formats exist nowhere else. Every step is a whole-tensor op
(no per-group Python loop, no data-dependent branch), so torch.compile fuses a quantizer into a
few memory-bound kernels; the random numbers for stochastic rounding are drawn before the
arithmetic, from the caller's torch.Generator, so compiled and eager runs use the same stream.

Outliers ("keep the top-k |x| of each group") use the (k+1)-th largest magnitude from
`topk(...).values` as the group's scale and a mask `|x| > scale` instead of the official
gather/scatter. That is bit-identical to the official code whenever the k-th and (k+1)-th largest
magnitudes differ; on a tie at that boundary the official result depends on topk's tie-break and
ours quantizes all tied elements on the (identical) scale, a difference of at most one rounding
of those elements (none for fp4_official, whose grid contains +-scale exactly).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from quant.spec import INT_BITS, QuantConfigError, QuantSpec

_TINY = torch.finfo(torch.float32).tiny
E2M1_MAX = 6.0
E4M3_MAX = 448.0

_HADAMARD_CACHE: dict[tuple[int, torch.device], torch.Tensor] = {}


def fake_quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    generator: Optional[torch.Generator] = None,
    signs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fake-quantize `x` as `spec` says; same shape and dtype, no autograd policy (see layer)."""
    return quantize_with_mask(x, spec, generator, need_mask=False, signs=signs)[0]


def quantize_with_mask(
    x: torch.Tensor,
    spec: QuantSpec,
    generator: Optional[torch.Generator] = None,
    need_mask: bool = False,
    signs: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fake-quantize and, if asked, return where the input lay inside the representable range
    (in the rotated basis when `spec.hadamard_size` is set), for the clipped straight-through
    estimator.

    A random Hadamard rotation (`spec.hadamard_random`) uses `signs` when given (the two
    operands of a GEMM share them), else draws them from `generator` before the rounding noise.
    """
    if not spec.enabled:
        return x, None
    spec = spec.validate().resolved()
    official = spec.format.endswith("_official")
    compute_dtype = x.dtype if official else torch.float32
    y = x.to(compute_dtype)
    if not spec.hadamard_random:
        signs = None
    elif signs is None:
        if generator is None:
            raise QuantConfigError("quant hadamard_random needs a generator or the GEMM's signs")
        signs = random_signs(spec.hadamard_size, generator, x.device)
    k = y.shape[-1]
    pad = (-k) % spec.hadamard_size if spec.hadamard_size else 0
    if pad:  # rotate a zero-padded last dim, as a kernel pads a reduction dim to the block
        y = F.pad(y, (0, pad))
    if spec.hadamard_size:
        y = hadamard_rotate(y.float(), spec.hadamard_size, signs).to(compute_dtype)
    groups, ungroup, valid = _to_groups(y, spec)
    noise = _uniform_noise(groups, generator) if spec.stochastic else None
    q, in_range = _QUANTIZERS[spec.format](groups, spec, noise, valid)
    out = ungroup(q)
    if spec.hadamard_size:
        out = hadamard_rotate(out.float(), spec.hadamard_size, signs, inverse=True)
    mask = ungroup(in_range) if need_mask else None
    if pad:
        out = crop(out, [*out.shape[:-1], k])
        mask = None if mask is None else crop(mask, [*mask.shape[:-1], k])
    return out.to(x.dtype), mask


@torch.compiler.disable
def random_signs(size: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """A vector of `size` random +-1.0 (float32) from the caller's generator, out of compiled graphs."""
    return torch.randint(0, 2, (size,), generator=generator, device=device).float() * 2 - 1


@torch.compiler.disable
def _uniform_noise(like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """U[0, 1) float32 noise from the caller's generator. Kept out of compiled graphs (dynamo
    cannot trace an explicit Generator), so compiled and eager runs draw the same stream."""
    return torch.rand(like.shape, generator=generator, device=like.device)


# ----------------------------------------------------------------------------------- grouping


@torch.library.custom_op("stablespam::crop", mutates_args=())
def crop(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """`t[:sizes[0], :sizes[1], ...]` as a new tensor, opaque to torch.compile.

    Removes the zero padding of partial groups. It is an opaque op rather than a slice because
    inductor's CPU loop split (torch 2.13, pytorch/pytorch#195582, fix in PR #196119) rewrites
    a kernel over the unpadded length K that reads per-group scales at index k // group_size
    into K // group_size full groups and drops the remainder: the last partial group of every
    row was left uninitialized (NaN/garbage loss under `trainer.compile=true`). Behind this op
    the padded result is materialized and every kernel's extent is a multiple of the group.
    """
    return t[tuple(slice(0, size) for size in sizes)].clone()


@crop.register_fake
def _(t, sizes):
    return t.new_empty(sizes)


def _crop_setup_context(ctx, inputs, output):
    ctx.padded_shape = inputs[0].shape


def _crop_backward(ctx, grad):
    pads = []
    for padded, size in zip(reversed(ctx.padded_shape), reversed(grad.shape)):
        pads += [0, padded - size]
    return F.pad(grad, pads), None


crop.register_autograd(_crop_backward, setup_context=_crop_setup_context)


def _to_groups(
    x: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], Optional[torch.Tensor]]:
    """Reshape to (num_groups, group_elems), zero-padding partial groups.

    Returns the groups, the inverse map and, when padding was needed, a boolean mask of real
    elements (min/max-based formats must ignore the padding; absmax ones are unaffected by 0).
    """
    size = spec.group_size
    if spec.block_2d:
        if x.dim() != 2:
            raise QuantConfigError(f"quant block_2d needs a 2-D tensor, got shape {tuple(x.shape)}")
        rows, cols = x.shape
        pad_r, pad_c = (-rows) % size, (-cols) % size
        padded = F.pad(x, (0, pad_c, 0, pad_r))
        rb, cb = (rows + pad_r) // size, (cols + pad_c) // size

        def group(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(rb, size, cb, size).permute(0, 2, 1, 3).reshape(-1, size * size)

        def ungroup(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(rb, cb, size, size).permute(0, 2, 1, 3).reshape(rb * size, cb * size)
            return crop(t, [rows, cols]) if pad_r or pad_c else t

        valid = None
        if pad_r or pad_c:
            valid = group(F.pad(torch.ones_like(x), (0, pad_c, 0, pad_r)) > 0)
        return group(padded), ungroup, valid

    if spec.grouping == "flat":
        n = x.numel()
        size = n if size == -1 else size
        pad = (-n) % size
        shape = x.shape
        groups = F.pad(x.reshape(-1), (0, pad)).reshape(-1, size)

        def ungroup_flat(t: torch.Tensor) -> torch.Tensor:
            return (crop(t.reshape(-1), [n]) if pad else t).reshape(shape)

        valid = None
        if pad:
            valid = (torch.arange(n + pad, device=x.device) < n).reshape(-1, size)
        return groups, ungroup_flat, valid

    k = x.shape[-1]
    size = k if size == -1 else size
    pad = (-k) % size
    lead = x.shape[:-1]
    groups = (F.pad(x, (0, pad)) if pad else x).reshape(-1, size)

    def ungroup_k(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(*lead, k + pad)
        return crop(t, [*lead, k]) if pad else t

    valid = None
    if pad:
        row = torch.arange(k + pad, device=x.device) < k
        valid = row.expand(*lead, k + pad).reshape(-1, size)
    return groups, ungroup_k, valid


# ----------------------------------------------------------------------------------- helpers


def _round(y: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """Round half to even, or stochastically: floor(y + u), u ~ U[0, 1) (E = y)."""
    if noise is None:
        return torch.round(y)
    return torch.floor(y + noise)


def _group_absmax(
    groups: torch.Tensor, topk: int
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-group absmax, or with `topk` outliers the (topk+1)-th largest |x| plus the mask of
    the elements above it (the kept outliers)."""
    magnitude = groups.abs()
    if topk == 0:
        return magnitude.amax(dim=-1, keepdim=True), None
    kth = torch.topk(magnitude, topk + 1, dim=-1, sorted=True).values[:, topk:]
    return kth, magnitude > kth


def _pow2_exponent(v: torch.Tensor) -> torch.Tensor:
    """floor(log2(v)) of positive normal float32 values, exactly, from the exponent bits."""
    return ((v.view(torch.int32) >> 23) & 0xFF) - 127


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2**exponent as float32, exactly, for integer exponents in [-126, 127]."""
    return ((exponent + 127).to(torch.int32) << 23).view(torch.float32)


def round_to_e2m1(y: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Round to the OCP FP4 E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} (signed), saturating at 6.

    The grid spacing is 0.5 below 2, 1 in [2, 4) and 2 from 4; rounding the index y/step half to
    even is exactly IEEE round-to-nearest-even on E2M1 (even index = even mantissa bit).
    """
    magnitude = y.abs()
    step = torch.where(magnitude < 2.0, 0.5, torch.where(magnitude < 4.0, 1.0, 2.0))
    rounded = (_round(magnitude / step, noise) * step).clamp_max(E2M1_MAX)
    return torch.copysign(rounded, y)


def round_to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round non-negative float32 values to FP8 E4M3 (RNE, subnormals, saturating at 448).

    Arithmetic rather than a float8 cast so that it runs and compiles on any device.
    """
    exponent = _pow2_exponent(v.clamp_min(_TINY)).clamp_min(-6)
    step = _pow2(exponent - 3)
    return (torch.round(v / step) * step).clamp_max(E4M3_MAX)


# ----------------------------------------------------------------------------------- formats


def _quantize_int(groups, spec, noise, valid):
    bits = INT_BITS[spec.format]
    if spec.symmetric:
        qmax = 2 ** (bits - 1) - 1
        absmax, outliers = _group_absmax(groups, spec.outlier_topk)
        levels = qmax if spec.narrow_range else qmax + 0.5
        lowest = -qmax if spec.narrow_range else -qmax - 1
        scale = (absmax / levels).clamp_min(_TINY)
        y = groups * (1.0 / scale)
        q = _round(y, noise).clamp(lowest, qmax) * scale
        in_range = (y >= lowest) & (y <= qmax)
        if outliers is not None:
            q = torch.where(outliers, groups, q)
            in_range = in_range | outliers
        return q, in_range
    # Asymmetric: the range is widened to include 0 so that the integer zero point lies in
    # [0, 2^b - 1] and 0 is exact (torchao's affine scheme; the official formula instead
    # clips every value of a one-signed group to one level).
    umax = 2**bits - 1
    minimum = groups.amin(dim=-1, keepdim=True).clamp_max(0.0)
    maximum = groups.amax(dim=-1, keepdim=True).clamp_min(0.0)
    scale = ((maximum - minimum) / umax).clamp_min(_TINY)
    zero_point = (-torch.round(minimum / scale)).clamp(0, umax)
    y = groups * (1.0 / scale)
    q = (_round(y, noise) + zero_point).clamp(0, umax)
    shifted = y + zero_point
    return (q - zero_point) * scale, (shifted >= 0) & (shifted <= umax)


def _e2m1_with_outliers(groups, y, scale, outliers, noise, prescale=1.0):
    """Round the scaled groups `y` (times `prescale`) to E2M1 and unscale; outlier entries pass
    through unquantized."""
    if prescale != 1.0:
        y, scale = y * prescale, scale / prescale
    q = round_to_e2m1(y, noise) * scale
    in_range = y.abs() <= E2M1_MAX
    if outliers is not None:
        q = torch.where(outliers, groups, q)
        in_range = in_range | outliers
    return q, in_range


def _quantize_fp4(groups, spec, noise, valid):
    absmax, outliers = _group_absmax(groups, spec.outlier_topk)
    scale = (absmax / E2M1_MAX).clamp_min(_TINY)
    return _e2m1_with_outliers(groups, groups / scale, scale, outliers, noise, spec.prescale)


def mx_scale(absmax: torch.Tensor) -> torch.Tensor:
    """OCP MX v1.0 E8M0 scale for E2M1 elements: 2^(floor(log2 amax) - 2), as float32."""
    exponent = (_pow2_exponent(absmax.clamp_min(_TINY)) - 2).clamp(-126, 127)
    return _pow2(exponent)


def _quantize_mxfp4(groups, spec, noise, valid):
    absmax, outliers = _group_absmax(groups, spec.outlier_topk)
    scale = mx_scale(absmax)
    return _e2m1_with_outliers(groups, groups / scale, scale, outliers, noise, spec.prescale)


def nvfp4_scales(groups: torch.Tensor, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 two-level scale: fp32 tensor scale amax/(6*448) and E4M3 block scales (as fp32)."""
    tensor_scale = groups.abs().amax() / (E2M1_MAX * E4M3_MAX)
    tensor_scale = torch.where(tensor_scale > 0, tensor_scale, torch.ones_like(tensor_scale))
    block_scale = round_to_e4m3(absmax / E2M1_MAX / tensor_scale)
    return tensor_scale, block_scale


def _quantize_nvfp4(groups, spec, noise, valid):
    absmax, outliers = _group_absmax(groups, spec.outlier_topk)
    tensor_scale, block_scale = nvfp4_scales(groups, absmax)
    scale = block_scale * tensor_scale
    y = torch.where(scale > 0, groups / scale, torch.zeros_like(groups))
    return _e2m1_with_outliers(groups, y, scale, outliers, noise, spec.prescale)


def _quantize_int4_official(groups, spec, noise, valid):
    """The official INT4 code's arithmetic, in the input's dtype, op for op."""
    if not spec.symmetric:
        low = groups if valid is None else torch.where(valid, groups, torch.inf)
        high = groups if valid is None else torch.where(valid, groups, -torch.inf)
        minimum, maximum = low.amin(dim=-1, keepdim=True), high.amax(dim=-1, keepdim=True)
        scales = (maximum - minimum).clamp(min=1e-5) / 15
        zeros = (-torch.round(minimum / scales)).clamp(0, 15)
        q = torch.clamp(torch.round(groups / scales) + zeros, 0, 15)
        return (q - zeros) * scales, torch.ones_like(groups, dtype=torch.bool)
    absmax, outliers = _group_absmax(groups, spec.outlier_topk)
    scale = absmax.clamp_min(1e-6)
    y = groups * (7 / scale)
    if noise is not None:
        y = y + (noise.to(groups.dtype) - 0.5)
    q = torch.round(y).clamp(-8, 7) * scale / 7
    if outliers is not None:
        q = torch.where(outliers, groups, q)
    return q, torch.ones_like(groups, dtype=torch.bool)


def _quantize_fp4_official(groups, spec, noise, valid):
    """The official "FP4" (LLM-FP4 E1M2 formula): worked through, a uniform grid of step
    alpha/4 on [-alpha, alpha], alpha = absmax of the non-outliers."""
    absmax, outliers = _group_absmax(groups, spec.outlier_topk)
    step = absmax.clamp(min=1e-6) * 0.5 * 0.5
    q = step * torch.round(groups / step)
    if outliers is not None:
        q = torch.where(outliers, groups, q)
    return q, torch.ones_like(groups, dtype=torch.bool)


_QUANTIZERS = {
    "int4": _quantize_int,
    "int8": _quantize_int,
    "fp4": _quantize_fp4,
    "mxfp4": _quantize_mxfp4,
    "nvfp4": _quantize_nvfp4,
    "int4_official": _quantize_int4_official,
    "fp4_official": _quantize_fp4_official,
}


# ----------------------------------------------------------------------------------- rotation


def hadamard_matrix(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix (symmetric, so it is its own inverse), in float64
    so that each dtype gets 1/sqrt(size) correctly rounded."""
    key = (size, torch.device(device))
    if key not in _HADAMARD_CACHE:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < size:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD_CACHE[key] = (h / size**0.5).to(key[1])
    return _HADAMARD_CACHE[key]


def hadamard_rotate(
    x: torch.Tensor, size: int, signs: Optional[torch.Tensor] = None, inverse: bool = False
) -> torch.Tensor:
    """Multiply each consecutive block b of `size` elements of the last dimension by H, or with
    a sign vector s by the random Hadamard matrix diag(s) H: b -> (b * s) H, and its inverse
    (orthogonal: H is symmetric) b -> (b H) * s."""
    k = x.shape[-1]
    if k % size:
        raise QuantConfigError(
            f"quant hadamard_size={size} does not divide the last dimension {k}"
        )
    h = hadamard_matrix(size, x.device).to(x.dtype)
    blocks = x.reshape(*x.shape[:-1], k // size, size)
    if signs is None:
        return (blocks @ h).reshape(x.shape)
    signs = signs.to(x.dtype)
    if inverse:
        return ((blocks @ h) * signs).reshape(x.shape)
    return ((blocks * signs) @ h).reshape(x.shape)
