"""The papers' LR schedule: linear warmup, cosine to 0.1x, exactly resumable."""
import math

import pytest
import torch

from trainer.schedule import WarmupDecay, set_learning_rates


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


def test_schedule_follows_a_changed_config_from_any_step():
    """A pure function of (step, config): a run resumed at step 50 with max_steps 100 -> 200 gets
    exactly what a run planned for 200 steps has at step 50 onwards."""
    old, new = WarmupDecay("cosine", 10, 100, 0.1), WarmupDecay("cosine", 10, 200, 0.1)
    assert new(50) > old(50)
    assert new(200) == pytest.approx(0.1) and new(150) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 140 / 190)))


def test_set_learning_rates_scales_each_group_and_skips_relative_step_groups():
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0},
                           {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 7.0}], lr=1.0)
    assert set_learning_rates(opt, [2e-3, None], 0.5) == pytest.approx(1e-3)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-3), 7.0]
