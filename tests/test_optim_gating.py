"""Device-gated steps (stablespam/gating.py): a skipped step changes no parameter and no state, an
applied one is the ungated step bit for bit, a skip equals a call not made (where no schedule counts
calls), and the device modes read nothing on the host."""
from __future__ import annotations

import contextlib

import pytest
import torch

from models import build_model
from optim_support import TINY, compose_optimizer
from stablespam import build_optimizer
from stablespam.gating import gated_step, gating_mode, prepare
from trainer.config import ConfigError, check_run_config, register_configs

NO_SCHEDULE = ("optimizer.reset_interval=0", "optimizer.total_steps=null")
# (preset, overrides, mode); resets every 3 steps where the optimizer has them, so a skip at the third
# step falls on a reset
CASES = {
    "adam": ("adam", (), "found_inf"),
    "adamw": ("adamw", (), "found_inf"),
    "lion": ("lion", (), "select"),
    "stable_spam": ("stable_spam", ("optimizer.reset_interval=3", "optimizer.total_steps=10"), "select"),
    "stable_spam_official": ("stable_spam_official", ("optimizer.reset_interval=3",), "select"),
    "stable_spam_8bit": ("stable_spam", ("optimizer.state_bits=8", "optimizer.reset_interval=3"), "select"),
    "stable_spam_4bit": ("stable_spam_4bit", ("optimizer.reset_interval=3",), "select"),
    "stable_spam_bf16": ("stable_spam", ("optimizer.reset_interval=3",), "select"),  # bf16 parameters
    "stable_spam_gs": ("stable_spam", ("optimizer.gradient_stabilizer=true", "optimizer.reset_interval=3"),
                       "select"),
    "gradient_stabilizer": ("gradient_stabilizer", (), "select"),  # AdamW base: found_inf
    "adam_moret_adagn_adaclip": ("adam_moret_adagn_adaclip", ("optimizer.moret_interval=3",), "select"),
    "adam_moret_adagn_spikeclip": ("adam_moret_adagn_spikeclip",
                                   ("optimizer.moret_interval=3", "optimizer.spike_delay=1"), "select"),
    "lion_adagn_adaclip": ("lion_adagn_adaclip", (), "select"),
    "spam": ("spam", ("optimizer.reset_interval=3", "optimizer.clip_delay=1"), "host"),
    "adam_mini": ("adam_mini", (), "host"),
    "adafactor": ("adafactor", (), "host"),
    "adamw_8bit": ("adamw", ("optimizer.state_bits=8",), "host"),
}
DEVICE = [name for name, case in CASES.items() if case[2] != "host"]


def build(name: str, *extra: str):
    preset, overrides, _ = CASES[name]
    torch.manual_seed(0)
    model = build_model(TINY, torch.bfloat16 if name.endswith("bf16") else torch.float32)
    optimizer = build_optimizer(model, compose_optimizer(preset, *overrides, *extra), total_steps=10)
    prepare(optimizer)
    return model, optimizer


def gradients(n: int) -> list[list[torch.Tensor]]:
    torch.manual_seed(1)
    shapes = [p.shape for p in build_model(TINY).parameters()]
    return [[torch.randn(s) * (1 + i) for s in shapes] for i in range(n)]


def step(model, optimizer, grads, skip=None) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.to(p.dtype, copy=True)
    if skip is None:
        optimizer.step()
    else:
        gated_step(optimizer, torch.tensor(skip))
    optimizer.zero_grad(set_to_none=True)


def snapshot(model, optimizer) -> tuple[list[torch.Tensor], dict]:
    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value
    return [p.detach().clone() for p in model.parameters()], copy(optimizer.state_dict())


def assert_same(a, b, path="", skip_keys=()) -> None:
    """Bitwise equal; a counter may be a host number on one side and a device tensor on the other."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            if key not in skip_keys:
                assert_same(a[key], b[key], f"{path}/{key}", skip_keys)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}", skip_keys)
    elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() > 0:
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert float(a) == float(b), path
    else:
        assert a == b, path


@pytest.mark.parametrize("name", CASES)
def test_gating_mode(name):
    _, optimizer = build(name)
    assert gating_mode(optimizer) == CASES[name][2]
    assert ("read on the host" in prepare(optimizer)) == (CASES[name][2] == "host")


@pytest.mark.parametrize("name", CASES)
def test_a_skipped_step_changes_nothing_and_an_applied_one_is_the_ungated_step(name):
    grads = gradients(6)
    grads[2] = [g * float("nan") for g in grads[2]]  # the skipped (third) step: a reset step, NaN gradients
    model, optimizer = build(name)
    reference_model, reference = build(name)
    for i, g in enumerate(grads):
        if i == 2:
            before = snapshot(model, optimizer)
            step(model, optimizer, g, skip=True)
            after = snapshot(model, optimizer)
            assert_same(before[0], after[0])
            assert_same(before[1], after[1], skip_keys=("global_step", "stabilizer_step"))
            reference_model.load_state_dict(model.state_dict())
            reference.load_state_dict(snapshot(model, optimizer)[1])  # copies: load_state_dict shares tensors
            continue
        step(model, optimizer, g, skip=False)
        step(reference_model, reference, g)
        assert_same(snapshot(model, optimizer), snapshot(reference_model, reference))


@pytest.mark.parametrize("name", ["lion", "stable_spam", "stable_spam_official", "stable_spam_4bit",
                                  "stable_spam_gs", "adamw", "gradient_stabilizer", "lion_adagn_adaclip"])
def test_a_skip_is_a_call_not_made(name):
    """Without a schedule that counts calls (no resets, no cosine) a skipped step is no step at all."""
    extra = NO_SCHEDULE if name.startswith("stable_spam") else ()
    grads = gradients(5)
    model, optimizer = build(name, *extra)
    other_model, other = build(name, *extra)
    for i, g in enumerate(grads):
        step(model, optimizer, g, skip=i == 2)
        if i != 2:
            step(other_model, other, g, skip=False)
    assert_same(snapshot(model, optimizer), snapshot(other_model, other),
                skip_keys=("global_step", "stabilizer_step"))


def test_a_reset_on_a_skipped_step_is_dropped():
    grads = gradients(4)
    model, optimizer = build("stable_spam")
    for i, g in enumerate(grads):
        step(model, optimizer, g, skip=i == 2)  # the third call is the reset step
    state = optimizer.state[next(model.parameters())]
    assert float(state["step"]) == 3 and float(state["stat_step"]) == 3, "no counter restarted at 1"
    assert optimizer.param_groups[0]["global_step"] == 4, "the call still counts for the schedule"


@contextlib.contextmanager
def no_host_reads():
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")
    with pytest.MonkeyPatch.context() as patch:
        for method in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
            patch.setattr(torch.Tensor, method, refuse)
        yield


@pytest.mark.parametrize("name", DEVICE)
def test_device_modes_read_nothing_on_the_host(name):
    model, optimizer = build(name)
    for i, g in enumerate(gradients(4)):
        with no_host_reads():
            step(model, optimizer, g, skip=i == 2)


def test_the_host_mode_reads_the_flag():
    model, optimizer = build("spam")
    with pytest.raises(AssertionError, match="read on the host"), no_host_reads():
        step(model, optimizer, gradients(1)[0], skip=True)


@pytest.mark.parametrize("policy", ["trainer.spike_policy=skip", "trainer.nonfinite_policy=skip"])
def test_a_compiled_stable_spam_step_with_a_skip_policy_is_refused(tiny_config, tmp_path, policy):
    register_configs()
    cfg = tiny_config(tmp_path, "optimizer.compile=true", policy)
    with pytest.raises(ConfigError, match="^optimizer.compile=true cannot be combined with trainer.spike_policy=skip"):
        check_run_config(cfg, 1)
    check_run_config(tiny_config(tmp_path, "optimizer.compile=true"), 1)  # compile alone still runs
