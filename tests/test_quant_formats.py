"""Format-level tests of quant.fake_quantize: exact level sets, scales, rounding, oracles."""
import math
from dataclasses import replace

import pytest
import torch

from quant import QuantConfigError, QuantSpec, fake_quantize, hadamard_rotate
from quant.functional import mx_scale, nvfp4_scales, round_to_e4m3

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _is_e2m1(values: torch.Tensor) -> bool:
    """Every value is +-an E2M1 magnitude, up to the float rounding of q / scale."""
    distance = (values.abs().reshape(-1, 1) - E2M1).abs().min(dim=1).values
    return bool((distance <= 1e-5).all())


# ------------------------------------------------------------------------------- level sets


def test_fp4_levels_are_e2m1_times_group_absmax_over_6():
    x = _randn(8, 64)
    q = fake_quantize(x, QuantSpec("fp4", group_size=32))
    for gx, gq in zip(x.reshape(-1, 32), q.reshape(-1, 32)):
        scale = gx.abs().max() / 6
        assert _is_e2m1(gq / scale)
        assert torch.unique(gq / scale).numel() <= 15
        assert gq.abs().max() == pytest.approx(6 * scale.item(), rel=1e-6)


def test_e2m1_round_to_nearest_even_on_ties():
    spec = QuantSpec("fp4", group_size=-1)
    # absmax 6 -> scale exactly 1: ties between grid points go to the even mantissa.
    x = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, 5.9, 0.26]])
    expected = torch.tensor([[6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0, 6.0, 0.5]])
    assert torch.equal(fake_quantize(x, spec), expected)


@pytest.mark.parametrize(
    "fmt,symmetric,narrow,lo,hi",
    [
        ("int4", True, True, -7, 7),
        ("int4", True, False, -8, 7),
        ("int8", True, True, -127, 127),
        ("int4", False, True, 0, 15),
    ],
)
def test_int_ranges(fmt, symmetric, narrow, lo, hi):
    x = _randn(16, 128, seed=1)
    spec = QuantSpec(fmt, group_size=64, symmetric=symmetric, narrow_range=narrow)
    q = fake_quantize(x, spec)
    for gx, gq in zip(x.reshape(-1, 64), q.reshape(-1, 64)):
        if symmetric:
            scale = gx.abs().max() / (hi if narrow else hi + 0.5)
            codes = gq / scale
        else:
            low, high = gx.min().clamp_max(0), gx.max().clamp_min(0)
            scale = (high - low) / 15
            zero_point = torch.round(-low / scale)
            codes = gq / scale + zero_point
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.min() >= lo - 1e-4 and codes.max() <= hi + 1e-4
        assert torch.unique(codes.round()).numel() <= hi - lo + 1


def test_mxfp4_scales_are_powers_of_two_per_32_and_elements_e2m1():
    x = _randn(4, 128, seed=2) * torch.logspace(-3, 3, 4).unsqueeze(1)
    q = fake_quantize(x, QuantSpec("mxfp4"))
    for gx, gq in zip(x.reshape(-1, 32), q.reshape(-1, 32)):
        # OCP MX v1.0: shared exponent floor(log2(amax)) - emax(E2M1)=2, from math.frexp.
        mantissa, exponent = math.frexp(gx.abs().max().item())
        scale = 2.0 ** (exponent - 1 - 2)
        assert _is_e2m1(gq / scale)
    scales = mx_scale(x.reshape(-1, 32).abs().amax(-1, keepdim=True))
    mantissas, _ = torch.frexp(scales)
    assert torch.all(mantissas == 0.5)


def test_nvfp4_block_scales_representable_in_e4m3_and_elements_e2m1():
    x = _randn(32, 64, seed=3) * torch.logspace(-2, 2, 32).unsqueeze(1)
    q = fake_quantize(x, QuantSpec("nvfp4"))
    groups = x.reshape(-1, 16)
    tensor_scale, block_scale = nvfp4_scales(groups, groups.abs().amax(-1, keepdim=True))
    assert tensor_scale == pytest.approx(x.abs().max().item() / (6 * 448))
    assert torch.equal(block_scale.to(torch.float8_e4m3fn).float(), block_scale)
    assert block_scale.max() <= 448
    assert _is_e2m1(q.reshape(-1, 16) / (block_scale * tensor_scale))


def test_e4m3_rounding_matches_torch_float8_cast():
    v = torch.cat([torch.rand(5000) * 448, torch.rand(1000) * 0.02, torch.tensor([0.0, 448.0])])
    assert torch.equal(round_to_e4m3(v), v.to(torch.float8_e4m3fn).float())


def test_nvfp4_2d_blocks_quantize_w_and_w_transpose_alike():
    w = _randn(48, 64, seed=4)
    spec = QuantSpec("nvfp4", block_2d=True)
    assert torch.equal(fake_quantize(w, spec).t(), fake_quantize(w.t().contiguous(), spec))


def test_fp4_official_nine_level_grid_and_outliers_kept():
    x = _randn(8, 512, seed=5)
    q = fake_quantize(x, QuantSpec("fp4_official", grouping="flat", outlier_topk=2))
    seen = set()
    for gx, gq in zip(x.reshape(-1, 256), q.reshape(-1, 256)):
        order = gx.abs().argsort(descending=True)
        outliers, rest = order[:2], order[2:]
        assert torch.equal(gq[outliers], gx[outliers])
        step = gx.abs()[rest].max() / 4
        codes = gq[rest] / step
        assert torch.allclose(codes, codes.round(), atol=1e-5)
        seen |= set(torch.unique(codes.round()).tolist())
    assert seen == set(range(-4, 5))  # 9 levels: {0, +-a/4, +-a/2, +-3a/4, +-a}


# ------------------------------------------------------------------------------- properties


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("int4"),
        QuantSpec("int4", symmetric=False),
        QuantSpec("int8"),
        QuantSpec("fp4"),
        QuantSpec("mxfp4"),
        QuantSpec("nvfp4"),
        QuantSpec("nvfp4", block_2d=True),
        QuantSpec("int4_official", grouping="flat", symmetric=False),
        QuantSpec("int4_official", grouping="flat", outlier_topk=2),
        QuantSpec("fp4_official", grouping="flat", outlier_topk=2),
    ],
    ids=lambda s: s.summary(),
)
def test_idempotent(spec):
    x = _randn(16, 256, seed=6)
    q = fake_quantize(x, spec)
    qq = fake_quantize(q, spec)
    if spec.format in ("mxfp4", "fp4_official"):
        assert torch.equal(qq, q)  # power-of-two step: the scale is recovered exactly
    else:
        # An fp32 quotient scale (amax/levels) is recovered to within a rounding, so the
        # re-quantized values sit on the same grid points up to a few ulp.
        assert torch.allclose(qq, q, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("int4", group_size=32, stochastic=True),
        QuantSpec("fp4", stochastic=True),
        QuantSpec("mxfp4", stochastic=True),
        QuantSpec("nvfp4", stochastic=True),
        QuantSpec("int4_official", group_size=32, outlier_topk=0, stochastic=True),
    ],
    ids=lambda s: s.summary(),
)
def test_stochastic_rounding_is_unbiased(spec):
    draws = 4000
    row = _randn(1, 32, seed=7)
    row[0, 0] = 3.0  # fixes every group's scale; values strictly inside the range
    x = row.expand(draws, 32).contiguous()
    q = fake_quantize(x, spec, torch.Generator().manual_seed(123))
    assert torch.unique(q[:, 5]).numel() == 2  # it does round both ways
    step = (q[:, 1:].max(0).values - q[:, 1:].min(0).values).clamp_min(1e-12)
    # Each draw lands on one of two neighbours `step` apart: std <= step/2.
    tolerance = 5 * step / 2 / math.sqrt(draws)
    assert torch.all((q[:, 1:].mean(0) - x[0, 1:]).abs() <= tolerance)
    rtn = fake_quantize(row, replace(spec, stochastic=False))
    assert not torch.all((rtn - row)[0, 1:].abs() <= tolerance)  # RTN fails the same check


def test_stochastic_rounding_reproducible_from_seeded_generator():
    x = _randn(8, 64, seed=8)
    spec = QuantSpec("int4", stochastic=True, group_size=32)
    a = fake_quantize(x, spec, torch.Generator().manual_seed(1))
    b = fake_quantize(x, spec, torch.Generator().manual_seed(1))
    c = fake_quantize(x, spec, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_k_grouping_pads_partial_groups_and_flat_straddles_rows():
    x = _randn(3, 100, seed=9)
    spec = QuantSpec("int4", group_size=64)
    q = fake_quantize(x, spec)
    # The tail group of each row (36 elements) is quantized on its own.
    for row_x, row_q in zip(x, q):
        for part_x, part_q in ((row_x[:64], row_q[:64]), (row_x[64:], row_q[64:])):
            reference = fake_quantize(part_x.unsqueeze(0), QuantSpec("int4", group_size=-1))
            assert torch.equal(part_q, reference[0])
    asym = QuantSpec("int4", group_size=64, symmetric=False)
    q = fake_quantize(x + 5.0, asym)  # zero padding must not enter min/max
    tail = fake_quantize(x[:, 64:] + 5.0, QuantSpec("int4", group_size=-1, symmetric=False))
    assert torch.equal(q[:, 64:], tail)
    flat = fake_quantize(x[:, :96], QuantSpec("int4", group_size=96, grouping="flat"))
    assert torch.equal(flat, fake_quantize(x[:, :96], QuantSpec("int4", group_size=96)))


def test_hadamard_rotation_is_orthogonal_and_quantizes_in_rotated_basis():
    x = _randn(4, 128, seed=10)
    assert torch.allclose(hadamard_rotate(hadamard_rotate(x, 32), 32), x, atol=1e-5)
    w = _randn(8, 128, seed=11)
    assert torch.allclose(hadamard_rotate(x, 32) @ hadamard_rotate(w, 32).t(), x @ w.t(), atol=1e-4)
    spec = QuantSpec("int4", group_size=32, hadamard_size=32)
    expected = hadamard_rotate(fake_quantize(hadamard_rotate(x, 32), QuantSpec("int4", group_size=32)), 32)
    assert torch.allclose(fake_quantize(x, spec), expected, atol=1e-6)
    spiky = x.clone()
    spiky[:, 3] = 40.0  # rotation spreads an outlier channel: less error than without
    plain = (fake_quantize(spiky, QuantSpec("int4", group_size=32)) - spiky).norm()
    rotated = (fake_quantize(spiky, spec) - spiky).norm()
    assert rotated < plain


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"format": "int3"}, "format"),
        ({"format": "mxfp4", "group_size": 16}, "mxfp4"),
        ({"format": "fp4", "symmetric": False}, "symmetric"),
        ({"format": "int4", "grouping": "rows"}, "grouping"),
        ({"format": "int4", "hadamard_size": 24}, "hadamard_size"),
        ({"format": "int4", "group_size": 0}, "group_size"),
        ({"format": "fp4_official", "stochastic": True}, "stochastic"),
    ],
)
def test_bad_spec_raises_one_clear_value_error(kwargs, field):
    with pytest.raises(QuantConfigError, match=field):
        fake_quantize(torch.ones(2, 64), QuantSpec(**kwargs))
    assert issubclass(QuantConfigError, ValueError)


# ------------------------------------------------------------------------------- oracles


def test_int4_per_group_weights_agree_with_torchao():
    from torchao.quantization import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )
    from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer

    w = _randn(64, 256, seed=12)
    w[:4] += 3.0  # some all-positive groups
    tiny = torch.finfo(torch.float32).tiny
    symmetric = IntxFakeQuantizer(
        IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True, eps=tiny)
    )
    ours = QuantSpec("int4", group_size=32, narrow_range=False)
    assert torch.equal(fake_quantize(w, ours), symmetric(w))
    # Asymmetric: torchao's affine primitives (its QAT quantizer mixes a float-domain zero point
    # into an integer-domain fake quant, so it is not a usable oracle for this case).
    block, qmin, qmax = (1, 32), 0, 15
    scale, zero_point = choose_qparams_affine(
        w, MappingType.ASYMMETRIC, block, torch.uint8, qmin, qmax, eps=tiny
    )
    codes = quantize_affine(w, block, scale, zero_point, torch.uint8, qmin, qmax)
    reference = dequantize_affine(codes, block, scale, zero_point, torch.uint8, qmin, qmax)
    assert torch.equal(fake_quantize(w, QuantSpec("int4", group_size=32, symmetric=False)), reference)


def _official_int4_weight_reference(w):
    """From the spec: asymmetric min/max per 256 flattened, levels 0..15, zero point."""
    g = w.reshape(-1, 256)
    mn, mx = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    scales = (mx - mn).clamp(min=1e-5) / 15
    zeros = (-torch.round(mn / scales)).clamp(0, 15)
    q = torch.clamp(torch.round(g / scales) + zeros, 0, 15)
    return ((q - zeros) * scales).reshape(w.shape)


def _official_int4_activation_reference(x, topk=2):
    """From the spec: top-k |x| per flattened group of 256 gathered out and scattered back,
    the rest round(x * 7 / absmax) clamped to [-8, 7]."""
    g = x.reshape(-1, 256).clone()
    index = g.abs().topk(topk, dim=-1).indices
    kept = torch.gather(g, 1, index)
    g.scatter_(1, index, torch.zeros_like(kept))
    scale = g.abs().max(dim=-1).values.clamp_min(1e-6)[:, None]
    q = (g * (7 / scale)).round().clamp(-8, 7)
    out = q * scale / 7
    out.scatter_(1, index, kept)
    return out.reshape(x.shape)


def _official_fp4_reference(x, topk=2, e=1, m=2, b=1):
    """From the spec: LLM-FP4's E1M2 formula with exponent bias b over the non-outliers."""
    g = x.reshape(-1, 256).clone()
    index = g.abs().topk(topk, dim=-1).indices
    kept = torch.gather(g, 1, index)
    g.scatter_(1, index, torch.zeros_like(kept))
    alpha = g.abs().max(dim=-1).values.clamp(min=1e-6)
    clamped = torch.clamp(g, -alpha[:, None], alpha[:, None])
    alpha_hat = alpha * (2**-b)
    b_hat = 2**e - torch.log2(alpha) + torch.log2(torch.tensor(2 - 2**-m)) - 1
    log_v = torch.floor(torch.log2(clamped.abs() + 1e-8) + b_hat[:, None])
    v = torch.pow(2, torch.clamp(log_v - m, min=1 - m))
    out = alpha_hat[:, None] * v * torch.round(clamped / (alpha_hat[:, None] * v) + 1e-12)
    out.scatter_(1, index, kept)
    return out.reshape(x.shape)


def _distinct_top3(x):
    """Tie-free test data: the 3 largest |x| of each group differ (official topk tie-break is
    implementation-defined)."""
    g = x.reshape(-1, 256)
    top = g.abs().topk(3, dim=-1).values
    assert torch.all(top[:, 0] > top[:, 1]) and torch.all(top[:, 1] > top[:, 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_formats_match_from_spec_references(dtype):
    x = (_randn(24, 160, seed=13) * 3).to(dtype)  # 3840 = 15 groups, straddling rows
    x.view(-1)[::256] = 50.0  # a spike per group, like the activations' outliers
    x.view(-1)[7::256] = -40.0
    _distinct_top3(x)
    # The formats' defaults are the official quantizers (flattened groups of 256, top-2 kept).
    weight_spec = QuantSpec("int4_official", symmetric=False)
    act_spec = QuantSpec("int4_official")
    fp4_spec = QuantSpec("fp4_official")
    assert fake_quantize(x, weight_spec).dtype == dtype
    assert torch.equal(fake_quantize(x, weight_spec), _official_int4_weight_reference(x))
    assert torch.equal(fake_quantize(x, act_spec), _official_int4_activation_reference(x))
    assert torch.equal(fake_quantize(x, fp4_spec), _official_fp4_reference(x))


def test_official_outlier_ties_differ_only_on_the_tied_elements():
    x = _randn(1, 256, seed=14)
    x[0, 10], x[0, 20], x[0, 30] = 9.0, -5.0, 5.0  # 2nd and 3rd largest |x| tie
    spec = QuantSpec("int4_official", grouping="flat", outlier_topk=2)
    ours, reference = fake_quantize(x, spec), _official_int4_activation_reference(x)
    differ = (ours != reference).nonzero()[:, 1].tolist()
    assert set(differ) <= {20, 30}
    assert torch.allclose(ours, reference, rtol=1e-6, atol=0)
    fp4 = QuantSpec("fp4_official", grouping="flat", outlier_topk=2)
    assert torch.equal(fake_quantize(x, fp4), _official_fp4_reference(x))
