"""Spike instrumentation: the counts of clipped entries and scaled-down tensors equal the ones
computed from the mechanisms' formulas, and nothing is counted outside `recording`."""
from __future__ import annotations

import torch

from stablespam import SPAM, AdaGN, Stabilized, StableSPAM, TransformStats, recording


def test_adaclip_counts_the_entries_above_the_bias_corrected_max_ema():
    gamma3 = 0.9
    p = torch.nn.Parameter(torch.zeros(200))
    opt = StableSPAM([p], lr=1e-3, gamma3=gamma3, reset_interval=0)
    first = torch.linspace(-1, 1, 200)
    p.grad = first.clone()
    opt.step()
    spike = first * 0.5
    spike[:7] = torch.tensor([5.0, -4.0, 3.0, 2.0, 1.5, 1.2, -1.1])
    p.grad = spike.clone()
    stats = TransformStats("cpu")
    with recording(stats):
        opt.step()
    max_ema = gamma3 * (1 - gamma3) * 1.0 + (1 - gamma3) * 5.0  # EMA of max |g| over the two steps
    threshold = max_ema / (1 - gamma3**2)
    assert stats.read()["adaclip_clipped_entries"] == int((spike.abs() > threshold).sum()) == 2
    assert stats.read()["norm_scaled_down_fraction"] in (0.0, 1.0)


def test_adagn_counts_tensors_scaled_down_and_nothing_outside_recording():
    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(3)]
    opt = Stabilized(torch.optim.SGD(params, lr=0.1), [AdaGN(gamma1=0.5, gamma2=0.5, eps=0.0)])
    for p in params:
        p.grad = torch.ones(4)
    idle = TransformStats("cpu")
    opt.step()
    assert idle.read() == {}
    grads = [torch.ones(4) * 10, torch.ones(4) * 0.1, torch.ones(4)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    stats = TransformStats("cpu")
    with recording(stats):
        opt.step()
    # after a first norm n0 = 2, the bias-corrected EMAs give target m/sqrt(v) for the new norm n:
    scaled_down = 0
    for g in grads:
        n = float(g.norm())
        m = (0.5 * 0.5 * 2 + 0.5 * n) / (1 - 0.25)
        v = (0.5 * 0.5 * 4 + 0.5 * n * n) / (1 - 0.25)
        scaled_down += m / v**0.5 < n
    assert stats.read()["norm_scaled_down_fraction"] == scaled_down / 3 == 2 / 3


def test_spam_spike_clip_counts_the_entries_beyond_threshold_times_v():
    p = torch.nn.Parameter(torch.zeros(50))
    opt = SPAM([p], lr=1e-3, threshold=5000.0, warmup_steps=0, clip_delay=2, reset_interval=1000)
    p.grad = torch.ones(50)
    opt.step()  # step 1: before clip_delay, nothing clipped, the second moment starts
    v = opt.state[p]["exp_avg_sq"].clone()
    grad = torch.ones(50)
    grad[:5] = 100.0
    p.grad = grad.clone()
    stats = TransformStats("cpu")
    with recording(stats):
        opt.step()
    assert stats.read()["spike_clipped_entries"] == int((grad.square() > 5000.0 * v).sum()) == 5
