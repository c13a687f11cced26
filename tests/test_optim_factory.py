"""Every optimizer yaml composes against its schema, builds on the tiny model, trains, and resumes
bit-identically from a mid-run state_dict."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException

from models import ModelConfig, build_model
from stablespam import Stabilized, StableSPAM, build_optimizer, register_configs

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "optimizer"
YAMLS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
TINY = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                   vocab_size=64)


def _compose(name: str, overrides: tuple[str, ...] = ()):
    """Compose `optimizer=<name>` exactly as the trainer does: the yaml inside group `optimizer`."""
    register_configs(ConfigStore.instance())
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR.parent), version_base="1.3"):
        cfg = compose(config_name=None, overrides=[f"+optimizer={name}", *overrides])
    return cfg.optimizer


def _batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (2, 12), generator=gen) for _ in range(n)]


def _train(model, opt, batches):
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _small_intervals(cfg):
    """Shrink resets/windows so that 2N = 8 steps cross resets and clipping windows."""
    for key, value in (("reset_interval", 3), ("moret_interval", 3), ("clip_delay", 1), ("warmup_steps", 2),
                       ("spike_delay", 1)):
        if key in cfg and (key not in ("moret_interval",) or cfg[key] > 0):
            cfg[key] = value
    if cfg.get("total_steps") is not None:
        cfg["total_steps"] = 5
    if "density" in cfg:
        cfg["density"] = 0.5
    return cfg


def test_all_required_presets_exist():
    required = {"adam", "adamw", "adafactor", "adam_mini", "lion", "spam", "stable_spam", "stable_spam_4bit",
                "stable_spam_bf16", "stable_spam_official", "spam_stablespam_paper", "lion_adagn_adaclip",
                "adam_mini_adagn_adaclip", "adam_moret", "adam_moret_adaclip", "adam_moret_adagn",
                "adam_moret_adagn_spikeclip"}
    assert required <= set(YAMLS)


def test_a_typo_or_wrong_type_fails_with_hydra_error():
    assert _compose("stable_spam").kind == "stable_spam"
    with pytest.raises(ConfigCompositionException):
        _compose("stable_spam", ("optimizer.gama1=0.5",))
    with pytest.raises(ConfigCompositionException):
        _compose("stable_spam", ("optimizer.reset_interval=often",))


@pytest.mark.parametrize("name", YAMLS)
def test_every_yaml_builds_and_resumes_bit_identically(name):
    cfg = _small_intervals(_compose(name))
    batches = _batches(8)
    torch.manual_seed(0)
    reference = build_model(TINY)
    init_state = {k: v.clone() for k, v in reference.state_dict().items()}
    opt = build_optimizer(reference, cfg, total_steps=8)
    _train(reference, opt, batches)

    first = build_model(TINY)
    first.load_state_dict(init_state)
    opt1 = build_optimizer(first, cfg, total_steps=8)
    _train(first, opt1, batches[:4])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed = build_model(TINY)
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(resumed, cfg, total_steps=8)
    opt2.load_state_dict(saved["optim"])
    _train(resumed, opt2, batches[4:])

    moved = False
    for (key, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name}: {key} differs after resume"
        moved = moved or not torch.equal(a, init_state[key])
    assert moved


CLOSURE_CASES = [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, raises=RuntimeError, reason=(
        "transformers' Adafactor.step is @torch.no_grad and calls the closure inside it, so the "
        "closure cannot backward; known, left as the library has it"))) if name == "adafactor" else name
    for name in YAMLS
]


@pytest.mark.parametrize("name", CLOSURE_CASES)
def test_step_evaluates_the_closure_with_gradients_and_returns_its_loss(name):
    torch.manual_seed(0)
    model = build_model(TINY)
    opt = build_optimizer(model, _compose(name), total_steps=4)
    ids = _batches(1)[0]

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        loss = opt.step(closure)
    assert loss is not None and loss.requires_grad
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert opt.step() is None


def test_bf16_resume_keeps_fp32_statistics():
    model = build_model(TINY, dtype=torch.bfloat16)
    opt = build_optimizer(model, _compose("stable_spam_bf16"), total_steps=10)
    _train(model, opt, _batches(2))
    fresh = build_optimizer(model, _compose("stable_spam_bf16"), total_steps=10)
    fresh.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for key in ("max_ema", "norm_ema", "norm_sq_ema"):
            assert fresh.state[p][key].dtype == torch.float32
            assert torch.equal(fresh.state[p][key], opt.state[p][key])


def test_groups_total_steps_and_lr_scheduler():
    model = build_model(TINY)
    cfg = _compose("stable_spam")
    cfg.total_steps = -1
    cfg.weight_decay = 0.1
    opt = build_optimizer(model, cfg, total_steps=123)
    assert isinstance(opt, StableSPAM)
    assert [g["total_steps"] for g in opt.param_groups] == [123, 123]
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in no_decay) == (p.dim() < 2 or "embed" in name)
    composed = build_optimizer(model, _compose("adam_moret_adagn_adaclip"), total_steps=10)
    assert isinstance(composed, Stabilized)
    sched = torch.optim.lr_scheduler.LambdaLR(composed, lambda step: 0.5)
    assert composed.base.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    del sched
