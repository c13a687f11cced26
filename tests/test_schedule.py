"""The papers' LR schedule: linear warmup, cosine to 0.1x, exactly resumable."""
import math

import pytest
import torch

from trainer.schedule import WarmupDecay, build_scheduler


def test_cosine_endpoints_and_midpoint():
    s = WarmupDecay("cosine", warmup_steps=10, max_steps=110, min_ratio=0.1)
    assert s(0) == pytest.approx(1 / 11)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)


def test_linear_and_constant():
    lin = WarmupDecay("linear", 0, 100, 0.0)
    assert lin(25) == pytest.approx(0.75)
    assert WarmupDecay("constant", 5, 100, 0.1)(50) == 1.0


def test_warmup_is_monotone_and_cosine_decreasing():
    s = WarmupDecay("cosine", 20, 200, 0.1)
    values = [s(i) for i in range(201)]
    assert all(a < b for a, b in zip(values[:20], values[1:21]))
    assert all(a >= b for a, b in zip(values[20:], values[21:]))
    assert min(values[20:]) == pytest.approx(0.1) and math.isclose(max(values), 1.0)


def test_scheduler_state_round_trip_continues_identically():
    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, build_scheduler(opt, "cosine", 3, 20, 0.1)

    opt, sched = make()
    for _ in range(7):
        opt.step(); sched.step()
    saved = sched.state_dict()
    expected = []
    for _ in range(5):
        opt.step(); sched.step(); expected.append(sched.get_last_lr()[0])
    opt2, sched2 = make()
    sched2.load_state_dict(saved)
    got = []
    for _ in range(5):
        opt2.step(); sched2.step(); got.append(sched2.get_last_lr()[0])
    assert got == expected
