"""`load_state_keeping_hyperparameters`: a run resumed under a changed `optimizer` config trains with the
new config's hyperparameters and the checkpoint's state (moments, statistics, counters).

The reference for the step after the resume is an optimizer built from the new config whose state
and counters are copied tensor by tensor from the checkpointed optimizer, without load_state_dict.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

from models import build_model
from optim_support import TINY, compose_optimizer
from stablespam import (
    GROUP_STATE_KEYS,
    OptimizerConfigError,
    Stabilized,
    build_optimizer,
    load_state_keeping_hyperparameters,
)





def _batches(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (2, 12), generator=gen) for _ in range(n)]


def _train(model, opt, batches):
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _levels(opt):
    return [opt, opt.base] if isinstance(opt, Stabilized) else [opt]


def _params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _hyperparameters(opt):
    return [{k: v for k, v in g.items() if k != "params" and k not in GROUP_STATE_KEYS} for g in opt.param_groups]


def _assert_state_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert actual[key].dtype == value.dtype, key
            assert torch.equal(actual[key], value), key
        else:
            assert actual[key] == value, key


def _checkpoint(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _trained(cfg, steps=4):
    torch.manual_seed(0)
    model = build_model(TINY)
    opt = build_optimizer(model, cfg, total_steps=20)
    _train(model, opt, _batches(steps, seed=1))
    return model, opt


def _copy_of(model):
    clone = build_model(TINY)
    clone.load_state_dict(model.state_dict())
    return clone


# name, overrides of the checkpointed run (A), overrides of the resumed run (B). Intervals are small
# so that A's 4 steps and B's 3 steps cross resets and clipping windows.
CASES = {
    "adamw": ([], ["optimizer.lr=1e-2", "optimizer.betas=[0.8,0.99]", "optimizer.eps=1e-6",
                   "optimizer.weight_decay=0.05"]),
    "stable_spam": (["optimizer.mode=corrected", "optimizer.reset_interval=3"],
                    ["optimizer.mode=official", "optimizer.lr=5e-3", "optimizer.betas=[0.85,0.99]",
                     "optimizer.eps=1e-7", "optimizer.weight_decay=0.1", "optimizer.gamma1=0.8",
                     "optimizer.gamma2=0.95", "optimizer.gamma3=0.99", "optimizer.reset_interval=5",
                     "optimizer.total_steps=10", "optimizer.eta_min=0.3"]),
    "spam": (["optimizer.reset_interval=3", "optimizer.warmup_steps=2", "optimizer.clip_delay=1",
              "optimizer.density=0.5"],
             ["optimizer.reset_interval=6", "optimizer.warmup_steps=3", "optimizer.clip_delay=2",
              "optimizer.density=0.5", "optimizer.lr=5e-3", "optimizer.betas=[0.8,0.99]", "optimizer.eps=1e-7",
              "optimizer.weight_decay=0.1", "optimizer.threshold=50", "optimizer.mask_seed=3"]),
    "adam_mini": ([], ["optimizer.lr=1e-2", "optimizer.betas=[0.8,0.99]", "optimizer.eps=1e-6",
                       "optimizer.weight_decay=0.05"]),
    "adafactor": ([], ["optimizer.lr=1e-2", "optimizer.beta1=0.8", "optimizer.eps=[1e-29,1e-2]",
                       "optimizer.clip_threshold=0.5", "optimizer.decay_rate=-0.5", "optimizer.weight_decay=0.01"]),
    "lion": ([], ["optimizer.lr=1e-3", "optimizer.betas=[0.8,0.9]", "optimizer.weight_decay=0.1"]),
    "gradient_stabilizer": ([], ["optimizer.lr=1e-2", "optimizer.betas=[0.8,0.99]", "optimizer.weight_decay=0.05",
                                 "optimizer.gs_gamma1=0.7", "optimizer.gs_gamma2=0.99", "optimizer.gs_eps=1e-8"]),
    "adam_moret_adagn_adaclip": (["optimizer.moret_interval=3"],
                                 ["optimizer.moret_interval=5", "optimizer.lr=1e-2", "optimizer.betas=[0.8,0.99]",
                                  "optimizer.weight_decay=0.1", "optimizer.gamma1=0.6", "optimizer.gamma2=0.95",
                                  "optimizer.gamma3=0.99", "optimizer.stabilizer_eps=1e-6"]),
}


@pytest.mark.parametrize("name", CASES)
def test_resume_keeps_new_hyperparameters_and_old_state(name):
    overrides_a, overrides_b = CASES[name]
    cfg_b = compose_optimizer(name, *overrides_b)
    model_a, opt_a = _trained(compose_optimizer(name, *overrides_a))
    saved = _checkpoint(opt_a)

    model_b = _copy_of(model_a)
    opt_b = build_optimizer(model_b, cfg_b, total_steps=20)
    built = copy.deepcopy(_hyperparameters(opt_b))
    load_state_keeping_hyperparameters(opt_b, saved)

    # every hyperparameter is B's, and B differs from A where the override says so
    assert _hyperparameters(opt_b) == built
    for override in set(overrides_b) - set(overrides_a):
        key = override.split("=")[0].split(".")[1]
        if key in opt_b.param_groups[0]:
            assert opt_b.param_groups[0][key] != opt_a.param_groups[0][key], key
    assert all(g["base_lr"] == cfg_b.lr for g in opt_b.param_groups)
    # every counter and state tensor is A's
    for group_a, group_b in zip(opt_a.param_groups, opt_b.param_groups):
        assert {k: group_b[k] for k in GROUP_STATE_KEYS if k in group_a} == \
               {k: group_a[k] for k in GROUP_STATE_KEYS if k in group_a}
    for level_a, level_b in zip(_levels(opt_a), _levels(opt_b)):
        for p_a, p_b in zip(_params(opt_a), _params(opt_b)):
            _assert_state_equal(level_b.state[p_b], level_a.state[p_a])

    # the next steps equal an optimizer built with B whose state was copied from A by hand
    model_r = _copy_of(model_a)
    opt_r = build_optimizer(model_r, cfg_b, total_steps=20)
    for group_a, group_r in zip(opt_a.param_groups, opt_r.param_groups):
        for key in GROUP_STATE_KEYS:
            if key in group_a:
                group_r[key] = group_a[key]
    for level_a, level_r in zip(_levels(opt_a), _levels(opt_r)):
        for p_a, p_r in zip(_params(opt_a), _params(opt_r)):
            level_r.state[p_r] = {k: v.clone() if isinstance(v, torch.Tensor) else copy.copy(v)
                                  for k, v in level_a.state[p_a].items()}
    batches = _batches(3, seed=2)
    _train(model_b, opt_b, batches)
    _train(model_r, opt_r, batches)
    for (key, b), r in zip(model_b.state_dict().items(), model_r.state_dict().values()):
        assert torch.equal(b, r), key


def test_torch_adam_takes_foreach_and_fused_from_the_build():
    """A checkpoint written with foreach resumed where the build chose fused (CUDA): the flags are the
    build's and Adam's step counters move to the parameters' device as fused Adam needs."""
    _, opt_a = _trained(compose_optimizer("adamw"))
    saved = _checkpoint(opt_a)
    assert saved["param_groups"][0]["foreach"] is True
    model_b = build_model(TINY)
    opt_b = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                               for g in build_optimizer(model_b, compose_optimizer("adamw"), 20).param_groups],
                              lr=1e-3, fused=True)
    load_state_keeping_hyperparameters(opt_b, saved)
    assert all(g["fused"] is True and g["foreach"] is None for g in opt_b.param_groups)
    for p in _params(opt_b):
        assert opt_b.state[p]["step"].device == p.device and opt_b.state[p]["step"].item() == 4
    _train(model_b, opt_b, _batches(1, seed=2))


def test_bf16_stable_spam_moments_follow_fp32_moments():
    torch.manual_seed(0)
    model = build_model(TINY, dtype=torch.bfloat16)
    opt_a = build_optimizer(model, compose_optimizer("stable_spam"), total_steps=10)
    _train(model, opt_a, _batches(2, seed=1))
    opt_b = build_optimizer(model, compose_optimizer("stable_spam", "optimizer.fp32_moments=true"), total_steps=10)
    load_state_keeping_hyperparameters(opt_b, _checkpoint(opt_a))
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt_a.state[p][key].dtype == torch.bfloat16
            assert opt_b.state[p][key].dtype == torch.float32
            assert torch.equal(opt_b.state[p][key], opt_a.state[p][key].float())
        assert opt_b.state[p]["max_ema"].dtype == torch.float32


def test_adafactor_first_moment_switched_on_starts_at_zero():
    _, opt_a = _trained(compose_optimizer("adafactor", "optimizer.beta1=null"))
    model_b = build_model(TINY)
    opt_b = build_optimizer(model_b, compose_optimizer("adafactor"), total_steps=10)
    load_state_keeping_hyperparameters(opt_b, _checkpoint(opt_a))
    for p in _params(opt_b):
        assert torch.equal(opt_b.state[p]["exp_avg"], torch.zeros_like(p))
        assert opt_b.state[p]["step"] == 4
    _train(model_b, opt_b, _batches(1, seed=2))


def test_a_stabilizer_switched_on_at_resume_starts_its_statistics_afresh():
    _, opt_a = _trained(compose_optimizer("adam_moret_adagn", "optimizer.moret_interval=3"))
    model_b = build_model(TINY)
    opt_b = build_optimizer(model_b, compose_optimizer("adam_moret_adagn", "optimizer.moret_interval=3",
                                              "optimizer.adaclip=true"), total_steps=10)
    load_state_keeping_hyperparameters(opt_b, _checkpoint(opt_a))
    _train(model_b, opt_b, _batches(1, seed=2))
    for p_a, p_b in zip(_params(opt_a), _params(opt_b)):
        assert opt_b.state[p_b]["adagn_step"] == opt_a.state[p_a]["adagn_step"] + 1 == 5
        assert opt_b.state[p_b]["adaclip_step"] == 1
    assert opt_b.param_groups[0]["stabilizer_step"] == 5

    # from a plain Adam checkpoint: AdaGN starts afresh, MoRet's phase would be unknown
    _, plain = _trained(compose_optimizer("adam"))
    opt_c = build_optimizer(build_model(TINY), compose_optimizer("adam", "optimizer.adagn=true"), total_steps=10)
    load_state_keeping_hyperparameters(opt_c, _checkpoint(plain))
    assert opt_c.param_groups[0]["stabilizer_step"] == 0 and not opt_c.state
    for p_a, p_c in zip(_params(plain), _params(opt_c)):
        _assert_state_equal(opt_c.base.state[p_c], plain.state[p_a])
    opt_d = build_optimizer(build_model(TINY), compose_optimizer("adam_moret"), total_steps=10)
    with pytest.raises(OptimizerConfigError, match=r"^optimizer\.moret_interval=1000 cannot start on resume"):
        load_state_keeping_hyperparameters(opt_d, _checkpoint(plain))


@pytest.mark.parametrize("name,before,after,message", [
    ("spam", ["optimizer.density=0.5"], ["optimizer.density=0.25"], r"^optimizer\.density=0\.25 cannot change"),
    ("stable_spam", ["optimizer.mode=official"], ["optimizer.mode=corrected"],
     r"^optimizer\.mode=corrected cannot resume an official-mode checkpoint"),
])
def test_changes_the_saved_state_cannot_follow_raise_naming_the_key(name, before, after, message):
    _, opt_a = _trained(compose_optimizer(name, *before), steps=1)
    opt_b = build_optimizer(build_model(TINY), compose_optimizer(name, *after), total_steps=10)
    with pytest.raises(OptimizerConfigError, match=message):
        load_state_keeping_hyperparameters(opt_b, _checkpoint(opt_a))


def test_a_different_optimizer_kind_raises():
    _, opt_a = _trained(compose_optimizer("adam"), steps=1)
    opt_b = build_optimizer(build_model(TINY), compose_optimizer("stable_spam"), total_steps=10)
    with pytest.raises(OptimizerConfigError, match=r"^optimizer\.kind differs"):
        load_state_keeping_hyperparameters(opt_b, _checkpoint(opt_a))
