"""GradientStabilizer against a per-tensor reference written from shared/reference/gradient-stabilizer.md,
its precision, its save/load, and its builds through the `optimizer` configs."""
from __future__ import annotations

import io
import math

import pytest
import torch

from models import build_model
from optim_support import TINY, compose_optimizer
from stablespam import (
    SPAM,
    AdaClip,
    AdaGN,
    GradientStabilizer,
    GSNorm,
    Lion,
    MoRet,
    Stabilized,
    StableSPAM,
    build_optimizer,
    load_state_keeping_hyperparameters,
)

SHAPES = [(5, 4), (7,), (2, 3, 2)]


class Reference:
    """The published step, one tensor at a time, in Python floats (float64)."""

    def __init__(self, n, gamma1=0.6, gamma2=0.999, eps=1e-12, bias_correction=True):
        self.gamma1, self.gamma2, self.eps, self.bias_correction = gamma1, gamma2, eps, bias_correction
        self.m, self.v, self.k, self.skipped = [0.0] * n, [0.0] * n, [0] * n, [0] * n

    def apply(self, grads):
        out = []
        for i, g in enumerate(grads):
            n = math.sqrt(sum(x * x for x in g.double().flatten().tolist()))
            if not math.isfinite(n) or n == 0:
                self.skipped[i] += 1
                out.append(g.clone())
                continue
            self.k[i] += 1
            self.m[i] = self.gamma1 * self.m[i] + (1 - self.gamma1) * n
            self.v[i] = self.gamma2 * self.v[i] + (1 - self.gamma2) * n * n
            m_hat, v_hat = self.m[i], self.v[i]
            if self.bias_correction:
                m_hat /= 1 - self.gamma1 ** self.k[i]
                v_hat /= 1 - self.gamma2 ** self.k[i]
            out.append(g * (m_hat / (math.sqrt(v_hat) + self.eps)) / max(n, self.eps))
        return out

    def norm_bound(self, i):
        """Cauchy-Schwarz on the bias-corrected EMA weights w1, w2 of the k norms seen:
        m_hat <= sqrt(sum w1^2 / w2) * sqrt(v_hat). It is 1 only when gamma1 == gamma2; with the
        defaults 0.6 / 0.999 it tends to 15.8, so a norm jump after a calm stretch comes out above 1."""
        k, g1, g2 = self.k[i], self.gamma1, self.gamma2
        w1 = [(1 - g1) * g1**j / (1 - g1**k) for j in range(k)]
        w2 = [(1 - g2) * g2**j / (1 - g2**k) for j in range(k)]
        return math.sqrt(sum(a * a / b for a, b in zip(w1, w2)))


def _stream(steps, seed, dtype=torch.float64, special=True):
    """Gradients whose scale drifts and spikes; tensor 1 is all-zero at step 2, tensor 2 holds an inf
    at step 4 and a nan at step 6, and tensor 0 is all-zero at the first step."""
    gen = torch.Generator().manual_seed(seed)
    stream = []
    for t in range(steps):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) * (1 + 3 * (t % 5 == 3)) for s in SHAPES]
        if special:
            if t == 0:
                grads[0].zero_()
            if t == 2:
                grads[1].zero_()
            if t == 4:
                grads[2].view(-1)[3] = math.inf
            if t == 6:
                grads[2].view(-1)[0] = math.nan
        stream.append([g.to(dtype) for g in grads])
    return stream


def _same(a, b):
    """Bit-identical, nan where nan."""
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("bias_correction", [True, False])
def test_matches_the_published_step_including_zero_and_nonfinite_tensors(bias_correction):
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES]
    opt = GradientStabilizer(torch.optim.SGD(params, lr=0.1), bias_correction=bias_correction)
    ref = Reference(len(SHAPES), bias_correction=bias_correction)
    largest = 0.0
    for grads in _stream(10, seed=0):
        expected = ref.apply(grads)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, (p, g, e) in enumerate(zip(params, grads, expected)):
            if torch.isfinite(g).all() and g.any():
                torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=0)
                if bias_correction:
                    assert p.grad.norm().item() <= ref.norm_bound(i) * (1 + 1e-12)
                    largest = max(largest, p.grad.norm().item())
            else:
                assert _same(p.grad, g)  # left alone
        for i, p in enumerate(params):
            state = opt.state[p]
            assert state["gs_step"].item() == ref.k[i] and state["gs_skipped"].item() == ref.skipped[i]
            assert state["gs_norm_ema"].item() == pytest.approx(ref.m[i], rel=1e-12, abs=0)
            assert state["gs_norm_sq_ema"].item() == pytest.approx(ref.v[i], rel=1e-12, abs=0)
    assert ref.skipped == [1, 1, 2] and opt.skipped_tensors().item() == 4
    assert largest > 1 or not bias_correction  # the spikes at t % 5 == 3 come out above 1


def test_wraps_any_optimizer_as_a_drop_in():
    """GradientStabilizer(AdamW) == AdamW fed the reference's stabilized gradients."""
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    plain = [torch.nn.Parameter(x.clone()) for x in init]
    opt = GradientStabilizer(torch.optim.AdamW(ours, lr=1e-2, weight_decay=0.1), gamma1=0.7, gamma2=0.99)
    peer = torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.1)
    ref = Reference(len(SHAPES), gamma1=0.7, gamma2=0.99)
    for grads in _stream(8, seed=2)[:4] + _stream(4, seed=3, special=False):
        for p, q, g in zip(ours, plain, grads):
            p.grad = g.clone()
        for q, e in zip(plain, ref.apply(grads)):
            q.grad = e
        opt.step()
        peer.step()
    for p, q in zip(ours, plain):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)


def test_bf16_gradients_keep_fp32_statistics():
    """(1 - gamma2) * ||g||^2 = 0.008 is below bf16 resolution near v = 1.4: fp32 EMAs still follow."""
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    opt = GradientStabilizer(torch.optim.SGD([p], lr=0.0))
    steps = 200
    for _ in range(steps):
        p.grad = torch.ones(8, dtype=torch.bfloat16)
        opt.step()
    state = opt.state[p]
    for key in ("gs_norm_ema", "gs_norm_sq_ema"):
        assert state[key].dtype == torch.float32
    assert state["gs_norm_sq_ema"].item() == pytest.approx(8 * (1 - 0.999**steps), rel=1e-5)
    assert state["gs_norm_ema"].item() == pytest.approx(math.sqrt(8) * (1 - 0.6**steps), rel=1e-6)
    # a constant gradient's stabilized norm is m_hat / sqrt(v_hat) = 1
    assert p.grad.dtype == torch.bfloat16
    assert p.grad.float().norm().item() == pytest.approx(1.0, rel=1e-2)


@pytest.mark.parametrize("loader", ["load_state_dict", "keeping_hyperparameters"])
def test_save_and_load_mid_run_reproduce_the_uninterrupted_run(loader):
    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    stream = _stream(10, seed=5, dtype=torch.float32, special=False)
    stream[2][1].zero_()
    stream[7][0].zero_()

    def run(params, opt, grads):
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()

    def make(params):
        return GradientStabilizer(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True))

    straight = [torch.nn.Parameter(x.clone()) for x in init]
    run(straight, make(straight), stream)

    first = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make(first)
    run(first, opt, stream[:5])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = [torch.nn.Parameter(x.clone()) for x in saved["params"]]
    opt2 = make(resumed)
    if loader == "load_state_dict":
        opt2.load_state_dict(saved["optim"])
    else:
        load_state_keeping_hyperparameters(opt2, saved["optim"])
    assert opt2.skipped_tensors().item() == 1
    run(resumed, opt2, stream[5:])
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    assert opt2.skipped_tensors().item() == 2




def _step(model, opt):
    ids = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def test_the_yaml_builds_adamw_with_the_papers_defaults():
    model = build_model(TINY)
    opt = build_optimizer(model, compose_optimizer("gradient_stabilizer"), total_steps=10)
    assert isinstance(opt, GradientStabilizer) and type(opt.base) is torch.optim.AdamW
    assert opt.transforms == (GSNorm(gamma1=0.6, gamma2=0.999, eps=1e-12, bias_correction=True),)
    _step(model, opt)
    assert all(opt.state[p]["gs_step"].item() == 1 for p in model.parameters())


@pytest.mark.parametrize("name,base", [("lion", Lion), ("spam", SPAM), ("stable_spam", StableSPAM),
                                       ("adam_mini", None), ("adafactor", None)])
def test_the_switch_puts_it_in_front_of_any_optimizer(name, base):
    model = build_model(TINY)
    opt = build_optimizer(model, compose_optimizer(name, "optimizer.gradient_stabilizer=true", "optimizer.gs_gamma1=0.5"),
                          total_steps=10)
    assert isinstance(opt, GradientStabilizer) and opt.transforms[0].gamma1 == 0.5
    if base is not None:
        assert type(opt.base) is base
    _step(model, opt)
    assert all(opt.state[p]["gs_step"].item() == 1 for p in model.parameters())


def test_the_switch_composes_first_with_the_other_stabilizers():
    opt = build_optimizer(build_model(TINY), compose_optimizer("adam_moret_adagn_adaclip", "optimizer.gradient_stabilizer=true"),
                          total_steps=10)
    assert type(opt) is Stabilized and opt.moret == MoRet(1000)
    assert [type(t) for t in opt.transforms] == [GSNorm, AdaClip, AdaGN]
