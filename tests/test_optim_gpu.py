"""CUDA-only behaviour of the optimizers (CI has no GPU: these tests collect there and skip).

Run on a GPU machine with `pytest -m gpu tests/test_optim_gpu.py`.
"""
from __future__ import annotations

import io
import math

import pytest
import torch

from models import build_model
from optim_support import TINY, compose_optimizer
from stablespam import (
    GradientStabilizer,
    StableSPAM,
    build_optimizer,
    load_state_keeping_hyperparameters,
)
from stablespam.gating import gated_step, prepare

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"




def _train(model, opt, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, TINY.vocab_size, (2, 12), generator=gen).to(next(model.parameters()).device)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_build_optimizer_chooses_fused_adam_on_cuda(name):
    model = build_model(TINY).to(DEVICE)
    opt = build_optimizer(model, compose_optimizer(name), total_steps=10)
    assert all(g["fused"] is True and not g["foreach"] for g in opt.param_groups)
    _train(model, opt, 2, seed=0)
    assert all(opt.state[p]["step"].device == p.device for p in model.parameters())


def test_a_cpu_checkpoint_resumes_fused_on_cuda():
    torch.manual_seed(0)
    cpu_model = build_model(TINY)
    cpu_opt = build_optimizer(cpu_model, compose_optimizer("adamw"), total_steps=10)
    _train(cpu_model, cpu_opt, 3, seed=0)
    buffer = io.BytesIO()
    torch.save(cpu_opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu", weights_only=False)

    model = build_model(TINY)
    model.load_state_dict(cpu_model.state_dict())
    model.to(DEVICE)
    opt = build_optimizer(model, compose_optimizer("adamw"), total_steps=10)
    load_state_keeping_hyperparameters(opt, saved)
    assert all(g["fused"] is True and g["foreach"] is None for g in opt.param_groups)
    for p in model.parameters():
        assert opt.state[p]["step"].device == p.device and opt.state[p]["exp_avg"].device == p.device
    _train(model, opt, 1, seed=1)


def test_compiled_stable_spam_equals_eager_across_a_reset():
    """fp32 parameters, 10 steps, resets at steps 4 and 8, the beta1/gamma1 cosine running.

    Tolerance: inductor fuses the elementwise ops (no intermediate rounding, FMA contraction) and may
    reduce amax/norm in another order, so each op can differ from eager by about one fp32 ulp
    (6e-8 relative). Updates are lr-sized and Adam normalizes them, so after 10 steps the parameters
    agree to ~1e-7 relative; rtol 1e-5 / atol 1e-6 leaves a 10-100x margin and still catches any
    semantic difference (a misplaced reset, a wrong bias correction or cosine moves parameters by
    >= 1e-4 here).
    """
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (16, 8, 4)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) * (1 + 0.5 * math.sin(t)) for s in shapes] for t in range(10)]
    for t in (2, 6):
        grads[t][0][3, 5] = 80.0  # spikes, so AdaClip acts
    eager = [torch.nn.Parameter(x.to(DEVICE)) for x in init]
    compiled = [torch.nn.Parameter(x.to(DEVICE)) for x in init]
    kwargs = dict(lr=1e-2, weight_decay=0.1, reset_interval=4, total_steps=12)
    opt_e = StableSPAM(eager, **kwargs)
    opt_c = StableSPAM(compiled, compile=True, **kwargs)
    for step_grads in grads:
        for a, b, g in zip(eager, compiled, step_grads):
            a.grad, b.grad = g.to(DEVICE, copy=True), g.to(DEVICE, copy=True)
        opt_e.step()
        opt_c.step()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "max_ema", "norm_ema", "norm_sq_ema"):
            torch.testing.assert_close(opt_c.state[b][key], opt_e.state[a][key], rtol=1e-5, atol=1e-7)
    assert opt_c.param_groups[0]["global_step"] == 10


def test_gradient_stabilizer_step_never_syncs_with_the_host():
    """Zero and non-finite norms are handled with device-side masks and counters, not `.item()`."""
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(64, 32), (32,), (8, 4)]]
    opt = GradientStabilizer(torch.optim.SGD(params, lr=1e-3, foreach=True))
    grads = [torch.randn_like(p) for p in params]
    grads[1].zero_()
    grads[2][0, 0] = float("inf")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.skipped_tensors().item() == 6
    assert opt.state[params[0]]["gs_step"].item() == 3


@pytest.mark.parametrize("name, overrides", [
    ("adamw", ()),
    ("stable_spam", ("optimizer.reset_interval=2",)),
    ("stable_spam_official", ("optimizer.reset_interval=2",)),
    ("stable_spam", ("optimizer.state_bits=4", "optimizer.reset_interval=2")),
    ("lion_adagn_adaclip", ()),
    ("gradient_stabilizer", ()),
    ("adam_moret_adagn_adaclip", ("optimizer.moret_interval=2",)),
])
def test_gated_steps_never_synchronize(name, overrides):
    """stablespam.gating's device modes, resets on skipped steps included, under CUDA's sync detector."""
    torch.manual_seed(0)
    model = build_model(TINY).to(DEVICE)
    optimizer = build_optimizer(model, compose_optimizer(name, *overrides), total_steps=10)
    assert "read on the host" not in prepare(optimizer)
    ids = torch.randint(0, TINY.vocab_size, (2, 12), device=DEVICE)
    skips = torch.tensor([False, True, False, True, False], device=DEVICE)
    for i in range(len(skips)):
        model(input_ids=ids, labels=ids).loss.backward()
        params = [p.detach().clone() for p in model.parameters()]
        torch.cuda.set_sync_debug_mode("error")
        try:
            gated_step(optimizer, skips[i])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        optimizer.zero_grad(set_to_none=True)
        unchanged = all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
        assert unchanged == (i % 2 == 1)
