"""SPAM, Adam-mini and Adafactor against their reference packages where semantics coincide, and
SPAM's schedule (reset, clip window, post-reset warmup, masked weight decay) against the spec."""
from __future__ import annotations

import math

import pytest
import torch
from adam_mini import Adam_mini
from pytorch_optimizer import SPAM as PeerSPAM
from transformers.optimization import Adafactor as HFAdafactor

from models import ModelConfig, build_model
from stablespam import SPAM, Adafactor, AdamMini
from stablespam.adam_mini import adam_mini_role
from stablespam.spam import warmup_scale


def _spiky_stream(shapes, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(steps):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        if i % 5 == 4:
            grads[0].view(-1)[1] = 30.0
        out.append(grads)
    return out


def test_spam_dense_matches_pytorch_optimizer_without_warmup():
    """pytorch-optimizer's post-reset warmup is a stateful recursive cosine; with warmup 0 both
    schedules are 1 and everything else (resets, clip window, clipping, bias corrections) coincides."""
    shapes = [(6, 5), (4,)]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    peer = [torch.nn.Parameter(x.clone()) for x in init]
    opt = SPAM(ours, lr=1e-2, threshold=3.0, reset_interval=6, warmup_steps=0, clip_delay=2, weight_decay=0.1)
    peer_opt = PeerSPAM(peer, lr=1e-2, threshold=3, update_proj_gap=6, warmup_epoch=0, grad_accu_steps=2,
                        weight_decay=0.1)
    for grads in _spiky_stream(shapes, 20, seed=1):
        for a, b, g in zip(ours, peer, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        peer_opt.step()
        for a, b in zip(ours, peer):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_spam_schedule_against_spec():
    """Scalar reference of the SPAM step from the spec: reset at n % dT == 0 before the update,
    no clipping for `clip_delay` steps after start and resets, warmup 0.01 -> 1 after each reset."""
    dt, warm, delay, theta = 5, 3, 2, 2.0
    assert warmup_scale(0, warm) == pytest.approx(0.01)
    assert warmup_scale(None, warm) == 1.0 and warmup_scale(warm, warm) == 1.0
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = SPAM([p], lr=0.1, betas=(0.9, 0.99), eps=1e-6, threshold=theta, reset_interval=dt,
               warmup_steps=warm, clip_delay=delay)
    ref = torch.zeros(3, dtype=torch.float64)
    m = torch.zeros(3, dtype=torch.float64)
    v = torch.zeros(3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    for n in range(1, 14):
        g = torch.randn(3, generator=gen, dtype=torch.float64) * (5.0 if n % 4 == 0 else 1.0)
        p.grad = g.clone()
        opt.step()
        if n % dt == 0:
            m.zero_(), v.zero_()
        if n >= delay and n % dt >= delay:
            limit = theta * v
            g = torch.where(g * g > limit, g.sign() * limit.sqrt(), g)
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        c = n % dt if n >= dt else None
        scale = 1.0 if c is None or c >= warm else 1 - 0.99 * (1 + math.cos(math.pi * c / (warm + 1))) / 2
        ref -= scale * 0.1 * math.sqrt(1 - 0.99**n) / (1 - 0.9**n) * m / (v.sqrt() + 1e-6)
        torch.testing.assert_close(p.detach(), ref, rtol=1e-9, atol=1e-12)


def test_spam_masked_group_decays_and_updates_only_masked_entries():
    p = torch.nn.Parameter(torch.ones(10, 10))
    opt = SPAM([{"params": [p], "density": 0.3}], lr=0.1, weight_decay=0.5, threshold=0.0)
    p.grad = torch.zeros(10, 10)
    opt.step()
    mask = opt.state[p]["mask"]
    assert mask.numel() == 30
    changed = (p.detach() != 1.0).view(-1)
    assert changed.sum().item() == 30
    assert torch.all(changed[mask])
    torch.testing.assert_close(p.detach().view(-1)[mask], torch.full((30,), 1 - 0.1 * 0.5))


def _named_model():
    cfg = ModelConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      vocab_size=40)
    torch.manual_seed(0)
    return build_model(cfg), cfg


def test_adam_mini_roles_and_agreement_with_package():
    model_a, cfg = _named_model()
    model_b, _ = _named_model()
    roles = {n: adam_mini_role(n) for n, _ in model_a.named_parameters()}
    assert roles["model.layers.0.self_attn.q_proj.weight"] == "head"
    assert roles["model.layers.0.self_attn.v_proj.weight"] == "row"
    assert roles["model.layers.0.mlp.down_proj.weight"] == "row"
    assert roles["model.embed_tokens.weight"] == "row" and roles["lm_head.weight"] == "row"
    assert roles["model.norm.weight"] == "tensor"
    ours = AdamMini(model_a.named_parameters(), lr=1e-3, weight_decay=0.1, dim=cfg.hidden_size,
                    n_heads=cfg.num_attention_heads)
    peer = Adam_mini(model_b.named_parameters(), lr=1e-3, weight_decay=0.1, dim=cfg.hidden_size,
                     n_heads=cfg.num_attention_heads, verbose=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=gen)
        for model, opt in ((model_a, ours), (model_b, peer)):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    q_state = ours.state[model_a.model.layers[0].self_attn.q_proj.weight]
    assert q_state["vmean"].shape == (cfg.num_attention_heads, 1)


@pytest.mark.parametrize("relative_step,beta1", [(False, 0.9), (True, None)])
def test_adafactor_matches_transformers(relative_step, beta1):
    shapes = [(8, 6), (5,)]
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    peer = [torch.nn.Parameter(x.clone()) for x in init]
    kwargs = dict(lr=None if relative_step else 1e-2, beta1=beta1, relative_step=relative_step,
                  scale_parameter=relative_step, warmup_init=False)
    opt, peer_opt = Adafactor(ours, **kwargs), HFAdafactor(peer, **kwargs)
    for grads in _spiky_stream(shapes, 6, seed=4):
        for a, b, g in zip(ours, peer, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        peer_opt.step()
    for a, b in zip(ours, peer):
        assert torch.equal(a, b)


def test_adafactor_bf16_state_stays_fp32_across_load():
    p = torch.nn.Parameter(torch.randn(4, 3).bfloat16())
    opt = Adafactor([p], lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9)
    p.grad = torch.randn(4, 3).bfloat16()
    opt.step()
    fresh = Adafactor([p], lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(fresh.state[p]["exp_avg_sq_row"], opt.state[p]["exp_avg_sq_row"])
