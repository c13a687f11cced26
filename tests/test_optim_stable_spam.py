"""Stable-SPAM pinned to an independent per-tensor reference written from the spec, to
pytorch-optimizer's StableSPAM where the semantics coincide, and to its invariants."""
from __future__ import annotations

import math

import pytest
import torch
from pytorch_optimizer import StableSPAM as PeerStableSPAM

from stablespam import StableSPAM
from stablespam.stable_spam import StepScalars, _stable_spam_bucket


class ReferenceStableSPAM:
    """Straight transcription of shared/reference/stable-spam.md, float64, one tensor at a time.

    mode="official": one counter k for statistics and Adam, reset after the update, cosine unclamped.
    mode="corrected": global counter for statistics, reset before the update, cosine clamped.
    """

    def __init__(self, params, lr, betas, eps, wd, gamma1, gamma2, gamma3, interval, total, eta_min, mode):
        self.params = params
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, wd
        self.g1, self.g2, self.g3 = gamma1, gamma2, gamma3
        self.interval, self.total, self.eta_min, self.mode = interval, total, eta_min, mode
        self.t = 0
        self.st = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p), k=0, kstat=0, mmax=0.0, mn=0.0, vn=0.0)
                   for p in params]

    def scale(self):
        if self.total is None:
            return 1.0
        t = self.t
        if self.mode == "corrected":
            t = min(t, self.total + 1)
        return self.eta_min + (1 - self.eta_min) * (1 + math.cos(math.pi * t / (self.total + 1))) / 2

    def step(self, grads):
        self.t += 1
        s = self.scale()
        reset = self.interval != 0 and self.t % self.interval == 0
        for p, g, st in zip(self.params, grads, self.st):
            g = g.clone()
            p.mul_(1 - self.lr * self.wd)
            st["k"] += 1
            st["kstat"] += 1
            kc = st["k"] if self.mode == "official" else st["kstat"]
            gmax = g.abs().max().item()
            st["mmax"] = self.g3 * st["mmax"] + (1 - self.g3) * gmax
            thr = st["mmax"] / (1 - self.g3**kc)
            g = torch.where(g.abs() > thr, g * thr / gmax, g)
            n = g.norm().item()
            g1 = self.g1 * s
            st["mn"] = g1 * st["mn"] + (1 - g1) * n
            st["vn"] = self.g2 * st["vn"] + (1 - self.g2) * n**2
            c = (st["mn"] / (1 - g1**kc)) / (math.sqrt(st["vn"] / (1 - self.g2**kc)) + self.eps)
            if n > 0:
                g = g / n * c
            m, v = st["m"], st["v"]
            if reset:
                st["k"] = 1
                st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                if self.mode == "corrected":
                    m, v = st["m"], st["v"]
            k = 1 if reset else (st["k"] if self.mode == "official" else st["k"])
            b1 = self.betas[0] * s
            b2 = self.betas[1]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).add_(g * g, alpha=1 - b2)
            p.sub_(self.lr / (1 - b1**k) * m / (v.sqrt() / math.sqrt(1 - b2**k) + self.eps))


def _grad_stream(shapes, steps, seed=0):
    """Gradients with occasional spikes, so AdaClip fires, and one all-zero tensor step."""
    gen = torch.Generator().manual_seed(seed)
    stream = []
    for i in range(steps):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) * (1 + 0.3 * math.sin(i)) for s in shapes]
        if i % 3 == 1:
            grads[0].view(-1)[i % grads[0].numel()] *= 50.0
        stream.append(grads)
    return stream


SHAPES = [(4, 5), (7,), (3, 2, 2)]
HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, gamma1=0.7, gamma2=0.9, gamma3=0.999)


@pytest.mark.parametrize("mode", ["official", "corrected"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_reference_across_resets_and_past_total_steps(mode, wd):
    steps, interval, total = 26, 7, 15  # resets at t = 7, 14, 21; cosine ends at t = 16
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    ref_params = [x.clone() for x in init]
    opt = StableSPAM(ours, weight_decay=wd, reset_interval=interval, total_steps=total, eta_min=0.5,
                     mode=mode, **HP)
    ref = ReferenceStableSPAM(ref_params, wd=wd, interval=interval, total=total, eta_min=0.5, mode=mode,
                              lr=HP["lr"], betas=HP["betas"], eps=HP["eps"], gamma1=HP["gamma1"],
                              gamma2=HP["gamma2"], gamma3=HP["gamma3"])
    for grads in _grad_stream(SHAPES, steps):
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
        for p, r in zip(ours, ref_params):
            torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)


def test_modes_differ_after_first_reset_only():
    """Official and corrected agree until the first reset (quirks 1, 2 only act from there)."""
    interval = 5
    trajectories = {}
    for mode in ("official", "corrected"):
        p = torch.nn.Parameter(torch.ones(6, dtype=torch.float64))
        opt = StableSPAM([p], lr=1e-2, reset_interval=interval, mode=mode)
        traj = []
        for grads in _grad_stream([(6,)], 8, seed=3):
            p.grad = grads[0].clone()
            opt.step()
            traj.append(p.detach().clone())
        trajectories[mode] = traj
    for t in range(interval - 1):
        assert torch.equal(trajectories["official"][t], trajectories["corrected"][t])
    assert not torch.allclose(trajectories["official"][interval - 1], trajectories["corrected"][interval - 1])


def test_corrected_matches_pytorch_optimizer():
    """pytorch-optimizer >= 4.0 fixes quirks 1 and 2 the same way. It skips all-zero gradients (we keep
    the official Adam step), so the stream has none, and its beta1 cosine is a stateful recursive
    CosineAnnealingLR that is not the closed form of the spec (0.978 vs 0.993 at t=1 of 12), so the
    cosine is off here; the cosine is pinned by the reference test above."""
    total_steps = None
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    peer = [torch.nn.Parameter(x.clone()) for x in init]
    opt = StableSPAM(ours, lr=1e-2, weight_decay=0.05, reset_interval=6, total_steps=total_steps,
                     mode="corrected")
    peer_opt = PeerStableSPAM(peer, lr=1e-2, weight_decay=0.05, update_proj_gap=6, t_max=total_steps)
    for grads in _grad_stream(SHAPES, 20, seed=7):
        for a, b, g in zip(ours, peer, grads):
            a.grad, b.grad = g.float().clone(), g.float().clone()
        opt.step()
        peer_opt.step()
        for a, b in zip(ours, peer):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("reset", [False, True])
def test_bucket_step_traces_as_one_graph(reset):
    """`compile=True` only pays off if dynamo sees the whole bucket step, with the per-step numbers
    as tensor inputs, without a graph break."""
    params = [torch.randn(s) for s in SHAPES]
    grads = [torch.randn(s) for s in SHAPES]
    moments = [[torch.zeros(s) for s in SHAPES] for _ in range(2)]
    stats = [[torch.zeros(()) for _ in SHAPES] for _ in range(3)]
    scalars = StepScalars(0.9, 0.7, 0.003, 0.657, 0.271, -1e-2, 0.054).to_tensors(torch.device("cpu"),
                                                                                   torch.float32)
    explained = torch._dynamo.explain(_stable_spam_bucket)(
        params, grads, *moments, *stats, scalars, beta2=0.999, eps=1e-8, gamma2=0.9, gamma3=0.999,
        reset=reset, official=True,
    )
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_step_does_not_recompile_as_the_schedule_moves():
    """lr, the cosine and the bias corrections change every step; they must not be graph guards."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = StableSPAM(params, lr=1e-2, reset_interval=3, total_steps=8, compile=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (t + 1))
    for grads in _grad_stream(SHAPES, 7, seed=4):
        for p, g in zip(params, grads):
            p.grad = g.float()
        opt.step()
        schedule.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # without a reset, with one


def test_compiled_step_matches_eager():
    gen = torch.Generator().manual_seed(9)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    eager = [torch.nn.Parameter(x.clone()) for x in init]
    compiled = [torch.nn.Parameter(x.clone()) for x in init]
    opt_e = StableSPAM(eager, lr=1e-2, reset_interval=4, total_steps=6)
    opt_c = StableSPAM(compiled, lr=1e-2, reset_interval=4, total_steps=6, compile=True)
    for grads in _grad_stream(SHAPES, 9, seed=2):
        for a, b, g in zip(eager, compiled, grads):
            a.grad, b.grad = g.float().clone(), g.float().clone()
        opt_e.step()
        opt_c.step()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
