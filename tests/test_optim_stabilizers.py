"""Invariants of the composable stabilizers, and StableSPAM == Adam + MoRet + AdaGN + AdaClip."""
from __future__ import annotations

import math

import pytest
import torch
from lion_pytorch import Lion as PeerLion

from stablespam import AdaClip, AdaGN, Lion, MoRet, SpikeClip, Stabilized, StableSPAM
from stablespam.transforms import adaclip_, adagn_


def _stream(shapes, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(steps):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        if i % 4 == 2:
            grads[0].view(-1)[0] = 40.0
        out.append(grads)
    return out


SHAPES = [(6, 4), (5,), (2, 3, 2)]


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_composed_adam_moret_adagn_adaclip_equals_stable_spam_corrected(wd):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    a = [torch.nn.Parameter(x.clone()) for x in init]
    b = [torch.nn.Parameter(x.clone()) for x in init]
    fused = StableSPAM(a, lr=3e-3, weight_decay=wd, reset_interval=5, mode="corrected")
    base = torch.optim.AdamW(b, lr=3e-3, weight_decay=wd, foreach=True)
    composed = Stabilized(base, [AdaClip(0.999), AdaGN(0.7, 0.9, 1e-8)], MoRet(5))
    for grads in _stream(SHAPES, 17, seed=1):
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        composed.step()
        for p, q in zip(a, b):
            assert torch.equal(p, q)


def test_adaclip_never_increases_any_entry_and_keeps_signs():
    gen = torch.Generator().manual_seed(2)
    max_ema = torch.zeros(2)
    for k in range(1, 30):
        grads = [torch.randn(50, generator=gen) * (10.0 if k % 5 == 0 else 1.0), torch.randn(3, 3, generator=gen)]
        before = [g.clone() for g in grads]
        thresholds = adaclip_(grads, max_ema, 0.9, 1 - 0.9**k)
        for g, g0, thr in zip(grads, before, thresholds):
            assert torch.all(g.abs() <= g0.abs())
            assert torch.all(torch.sign(g) == torch.sign(g0))
            assert torch.all(g.abs() <= thr * (1 + 1e-6))
            assert torch.equal(g[g0.abs() <= thr], g0[g0.abs() <= thr])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adaclip_scales_clipped_entries_by_exactly_threshold_over_max(dtype):
    """The clip factor is exactly r = threshold / max |g| (not 1 + (r - 1), which loses r's digits
    when r is small) and exactly 1 elsewhere; an all-zero gradient stays zero."""
    before = [torch.tensor([3e7, -7.0, 0.5, -2e4, 1e3], dtype=dtype), torch.zeros(3, dtype=dtype)]
    grads = [g.clone() for g in before]
    max_ema = torch.tensor([5.0, 0.0])
    thresholds = adaclip_(grads, max_ema, 0.999, 1.0)
    assert torch.equal(grads[1], before[1])
    thr = thresholds[0]
    ratio = (thr / before[0].float().abs().max()).to(dtype)
    assert 0 < ratio < 2e-3
    expected = torch.where(before[0].abs() > thr, before[0] * ratio, before[0])
    assert torch.equal(grads[0], expected)
    assert torch.equal(grads[0][2:], before[0][2:]) and not torch.equal(grads[0][:2], before[0][:2])


def test_adagn_output_norm_equals_its_target():
    gen = torch.Generator().manual_seed(3)
    norm_ema, norm_sq_ema = torch.zeros(2), torch.zeros(2)
    m = [0.0, 0.0]
    v = [0.0, 0.0]
    for k in range(1, 10):
        grads = [torch.randn(40, generator=gen) * k, torch.randn(7, generator=gen)]
        norms = [g.norm().item() for g in grads]
        target = adagn_(grads, norm_ema, norm_sq_ema, 0.7, 0.9, 1 - 0.7**k, 1 - 0.9**k, 1e-8)
        for i, g in enumerate(grads):
            m[i] = 0.7 * m[i] + 0.3 * norms[i]
            v[i] = 0.9 * v[i] + 0.1 * norms[i] ** 2
            expected = (m[i] / (1 - 0.7**k)) / (math.sqrt(v[i] / (1 - 0.9**k)) + 1e-8)
            assert g.norm().item() == pytest.approx(expected, rel=1e-5)
            assert target[i].item() == pytest.approx(expected, rel=1e-5)


def test_moret_zeroes_base_moments_exactly_at_the_reset_step():
    p = torch.nn.Parameter(torch.ones(4))
    opt = Stabilized(torch.optim.Adam([p], lr=1e-2), [], MoRet(3))
    grad = torch.tensor([1.0, -2.0, 3.0, 0.5])
    for t in range(1, 8):
        p.grad = grad.clone()
        opt.step()
        state = opt.base.state[p]
        if t % 3 == 0:
            # zeroed just before this step's update: the moments hold this step's gradient only
            torch.testing.assert_close(state["exp_avg"], 0.1 * grad)
            torch.testing.assert_close(state["exp_avg_sq"], 0.001 * grad * grad)
            assert state["step"].item() == 1
        else:
            assert state["step"].item() == (t % 3) + (1 if t > 3 else 0)


def test_bf16_parameters_do_not_stall_statistics():
    """(1 - gamma3) * max|g| = 1e-3 is below bf16 resolution at 1.0: the fp32 EMA must still move."""
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    opt = StableSPAM([p], lr=1e-3, gamma3=0.999, gamma2=0.99999)
    for _ in range(200):
        p.grad = torch.ones(8, dtype=torch.bfloat16)
        opt.step()
    state = opt.state[p]
    assert state["max_ema"].dtype == torch.float32
    assert state["max_ema"].item() == pytest.approx(1 - 0.999**200, rel=1e-4)
    assert state["norm_sq_ema"].item() == pytest.approx(8 * (1 - 0.99999**200), rel=1e-3)


def test_lion_with_adagn_adaclip_runs_and_lion_matches_lion_pytorch():
    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    peer = [torch.nn.Parameter(x.clone()) for x in init]
    opt = Lion(ours, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    peer_opt = PeerLion(peer, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    for grads in _stream(SHAPES, 10, seed=5):
        for a, b, g in zip(ours, peer, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        peer_opt.step()
        for a, b in zip(ours, peer):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    stabilized = Stabilized(Lion(ours, lr=1e-3), [AdaGN(), AdaClip()])
    for grads in _stream(SHAPES, 5, seed=6):
        for a, g in zip(ours, grads):
            a.grad = g.clone()
        stabilized.step()
    assert all(torch.isfinite(a).all() for a in ours)


def test_spike_clip_needs_a_second_moment():
    p = torch.nn.Parameter(torch.ones(3))
    opt = Stabilized(Lion([p], lr=1e-3), [SpikeClip(threshold=10.0, delay=1)])
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        opt.step()
        p.grad = torch.ones(3)
        opt.step()
