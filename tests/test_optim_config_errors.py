"""Every invalid `optimizer` value fails in build_optimizer with one OptimizerConfigError line that names
the Hydra key; the classes refuse a negative learning rate from Python too."""
from __future__ import annotations


import pytest
import torch

from models import build_model
from optim_support import TINY, compose_optimizer
from stablespam import (
    SPAM,
    Adafactor,
    AdamMini,
    Lion,
    OptimizerConfigError,
    StableSPAM,
    build_optimizer,
)





@pytest.fixture(scope="module")
def model():
    return build_model(TINY)


REJECTED = [
    ("adamw", "optimizer.lr=-0.001", "optimizer.lr=-0.001 must be >= 0"),
    ("adam", "optimizer.lr=-0.001", "optimizer.lr=-0.001 must be >= 0"),
    ("adafactor", "optimizer.lr=-0.001", "optimizer.lr=-0.001 must be >= 0"),
    ("adam_mini", "optimizer.lr=-0.001", "optimizer.lr=-0.001 must be >= 0"),
    ("spam", "optimizer.lr=-0.001", "optimizer.lr=-0.001 must be >= 0"),
    ("lion", "optimizer.lr=-0.001", "optimizer.lr=-0.001 must be >= 0"),
    ("stable_spam", "optimizer.lr=-0.001", "optimizer.lr=-0.001 must be >= 0"),
    ("adam_moret_adagn_adaclip", "optimizer.lr=-0.001", "optimizer.lr=-0.001 must be >= 0"),
    ("adamw", "optimizer.lr=inf", "optimizer.lr=inf must be a finite number"),
    ("adamw", "optimizer.betas=[0.9,1.0]", "optimizer.betas=[0.9,1.0] must be two values in [0, 1)"),
    ("lion", "optimizer.betas=[-0.1,0.99]", "optimizer.betas=[-0.1,0.99] must be two values in [0, 1)"),
    ("spam", "optimizer.betas=[0.9]", "optimizer.betas=[0.9] must be two values in [0, 1)"),
    ("stable_spam", "optimizer.betas=[0.9,1.5]", "optimizer.betas=[0.9,1.5] must be two values in [0, 1)"),
    ("adam_mini", "optimizer.betas=[1.0,0.999]", "optimizer.betas=[1.0,0.999] must be two values in [0, 1)"),
    ("adamw", "optimizer.eps=-1e-08", "optimizer.eps=-1e-08 must be >= 0"),
    ("adafactor", "optimizer.eps=[-1e-30,0.001]", "optimizer.eps=[-1e-30,0.001] must be >= 0"),
    ("adam_mini", "optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1 must be >= 0"),
    ("lion", "optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1 must be >= 0"),
    ("spam", "optimizer.reset_interval=-1", "optimizer.reset_interval=-1 must be >= 0 (0 = never)"),
    ("stable_spam", "optimizer.reset_interval=-5", "optimizer.reset_interval=-5 must be >= 0 (0 = never)"),
    ("adam_moret", "optimizer.moret_interval=-1", "optimizer.moret_interval=-1 must be >= 0 (0 = off)"),
    ("spam", "optimizer.warmup_steps=-1", "optimizer.warmup_steps=-1 must be >= 0"),
    ("spam", "optimizer.clip_delay=-1", "optimizer.clip_delay=-1 must be >= 0"),
    ("adam_moret_adagn_spikeclip", "optimizer.spike_delay=-1", "optimizer.spike_delay=-1 must be >= 0"),
    ("stable_spam", "optimizer.gamma1=1.0", "optimizer.gamma1=1.0 must lie in [0, 1)"),
    ("stable_spam", "optimizer.gamma2=1.5", "optimizer.gamma2=1.5 must lie in [0, 1)"),
    ("stable_spam", "optimizer.gamma3=-0.1", "optimizer.gamma3=-0.1 must lie in [0, 1)"),
    ("adam_moret_adagn", "optimizer.gamma1=-1", "optimizer.gamma1=-1.0 must lie in [0, 1)"),
    ("lion_adagn_adaclip", "optimizer.gamma3=1.0", "optimizer.gamma3=1.0 must lie in [0, 1)"),
    ("spam", "optimizer.threshold=-1", "optimizer.threshold=-1.0 must be >= 0 (0 = no spike clipping)"),
    ("adam_moret_adagn_spikeclip", "optimizer.spike_threshold=-1",
     "optimizer.spike_threshold=-1.0 must be >= 0 (0 = no spike clipping)"),
    ("adafactor", "optimizer.clip_threshold=0", "optimizer.clip_threshold=0.0 must be > 0"),
    ("adam_moret_adagn", "optimizer.stabilizer_eps=-1e-8", "optimizer.stabilizer_eps=-1e-08 must be >= 0"),
    ("gradient_stabilizer", "optimizer.gs_gamma1=1.0", "optimizer.gs_gamma1=1.0 must lie in [0, 1)"),
    ("spam", "optimizer.gs_gamma2=-0.5", "optimizer.gs_gamma2=-0.5 must lie in [0, 1)"),
    ("stable_spam", "optimizer.gs_eps=-1e-12", "optimizer.gs_eps=-1e-12 must be >= 0"),
    ("spam", "optimizer.density=0", "optimizer.density=0.0 must lie in (0, 1]"),
    ("spam", "optimizer.density=1.5", "optimizer.density=1.5 must lie in (0, 1]"),
    ("stable_spam", "optimizer.eta_min=1.5", "optimizer.eta_min=1.5 must lie in [0, 1]"),
    ("stable_spam", "optimizer.total_steps=0",
     "optimizer.total_steps=0 must be null, -1 (= trainer.max_steps) or >= 1"),
    ("stable_spam", "optimizer.mode=fast", "optimizer.mode=fast must be one of official, corrected"),
    ("adafactor", "optimizer.beta1=1.0", "optimizer.beta1=1.0 must be null or lie in [0, 1)"),
    ("adafactor", "optimizer.decay_rate=0.8",
     "optimizer.decay_rate=0.8 must be <= 0 (Adafactor's beta2 = 1 - step^decay_rate)"),
    ("adafactor", "optimizer.relative_step=true",
     "optimizer.lr=0.001 must be null with optimizer.relative_step=true (Adafactor sets its own step size)"),
    ("adafactor", "optimizer.lr=null", "optimizer.lr=null needs optimizer.relative_step=true"),
    ("adafactor", "optimizer.warmup_init=true", "optimizer.warmup_init=true needs optimizer.relative_step=true"),
    ("adamw", "optimizer.kind=sgd",
     "optimizer.kind=sgd must be one of adam, adamw, lion, adam_mini, adafactor, spam, stable_spam"),
]


@pytest.mark.parametrize("name,override,message", REJECTED)
def test_build_rejects_with_one_line_naming_the_key(model, name, override, message):
    with pytest.raises(OptimizerConfigError) as raised:
        build_optimizer(model, compose_optimizer(name, override), total_steps=10)
    assert str(raised.value) == message
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("name,overrides", [
    ("stable_spam", ["optimizer.gamma1=-1"]),  # "use beta1"
    ("stable_spam", ["optimizer.total_steps=-1", "optimizer.reset_interval=0"]),
    ("adafactor", ["optimizer.lr=null", "optimizer.relative_step=true", "optimizer.beta1=null"]),
    ("lion", ["optimizer.lr=0"]),
    ("adamw", ["optimizer.betas=[0.0,0.0]", "optimizer.eps=0"]),
    ("spam", ["optimizer.threshold=0", "optimizer.density=1.0"]),
])
def test_build_accepts_boundary_values(model, name, overrides):
    build_optimizer(model, compose_optimizer(name, *overrides), total_steps=10)


@pytest.mark.parametrize("make", [
    lambda p: SPAM(p, lr=-1e-3),
    lambda p: Adafactor(p, lr=-1e-3, relative_step=False, scale_parameter=False),
    lambda p: Lion(p, lr=-1e-4),
    lambda p: StableSPAM(p, lr=-1e-3),
    lambda p: AdamMini([("w", p[0])], lr=-1e-3, dim=4, n_heads=2),
], ids=["spam", "adafactor", "lion", "stable_spam", "adam_mini"])
def test_classes_reject_a_negative_learning_rate(make):
    with pytest.raises(ValueError, match="lr"):
        make([torch.nn.Parameter(torch.ones(4, 4))])
