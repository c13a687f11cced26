"""Per-GEMM quantization and the FP4 training recipes (configs/quant/{nvfp4_recipe,quartet,
mxfp4_backward}.yaml), checked against plain-PyTorch GEMMs whose operand specs are written here
from the papers, against torchao's MX/NVFP4 quantizers, and statistically (stochastic rounding)."""
import math
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import quant
from models import ModelConfig, build_model
from quant import QuantConfigError, QuantLinear, QuantSpec, build_converter, fake_quantize, hadamard_rotate
from quant.converter import to_quant_config
from quant.functional import nvfp4_scales
from quant.gemms import DgradGemm, GemmSpecs, WgradGemm
from quant_support import quant_yaml

TINY = ModelConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                   num_attention_heads=4, vocab_size=8192)
# Distinct sizes, so an operand quantized along the wrong dimension fails (or changes the groups).
TOKENS, IN, OUT = 64, 96, 160


def _recipe(name: str):
    return to_quant_config(quant_yaml(name))


def _layer(cfg, streams) -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_linear(
        nn.Linear(IN, OUT), weight_spec=cfg.weight, activation_spec=cfg.activation,
        gradient_spec=cfg.gradient, gemms=cfg.gemms, estimator=cfg.estimator, streams=streams,
    )


def _operands(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, TOKENS // 2, IN, generator=g)
    x[..., 5] *= 20  # an outlier channel, so rotations and scales matter
    return x, torch.randn(2, TOKENS // 2, OUT, generator=g) * 1e-3


# The papers' operand specs, written out independently of the yamls: (spec, draws noise?) per slot;
# "fwd" = the backward GEMM reuses the forward's quantized operand.
NV = QuantSpec("nvfp4")
NV_SR = QuantSpec("nvfp4", stochastic=True)
NV_RHT = dict(hadamard_size=16, hadamard_random=True)
MX_BWD = QuantSpec("mxfp4", stochastic=True, hadamard_size=32, hadamard_random=True, prescale=0.75)
PAPERS = {
    # NVIDIA arXiv 2509.25149: W 16x16, X and dY 1x16, SR on dY only, 16-point RHT on both wgrad operands.
    "nvfp4_recipe": {"fwd_x": NV, "fwd_w": QuantSpec("nvfp4", block_2d=True),
                     "dgrad_dy": NV_SR, "dgrad_w": "fwd",
                     "wgrad_dy": replace(NV_SR, **NV_RHT), "wgrad_x": replace(NV, **NV_RHT)},
    # Quartet: MXFP4 everywhere; forward Hadamard RTN; backward random Hadamard + SR (3/4 pre-scale).
    "quartet": {"fwd_x": QuantSpec("mxfp4", hadamard_size=32), "fwd_w": QuantSpec("mxfp4", hadamard_size=32),
                "dgrad_dy": MX_BWD, "dgrad_w": MX_BWD, "wgrad_dy": MX_BWD, "wgrad_x": MX_BWD},
    # Tseng et al.: forward high precision, both backward GEMMs MXFP4 with RHT + SR (3/4).
    "mxfp4_backward": {"fwd_x": QuantSpec(), "fwd_w": QuantSpec(),
                       "dgrad_dy": MX_BWD, "dgrad_w": MX_BWD, "wgrad_dy": MX_BWD, "wgrad_x": MX_BWD},
}


def _reference_pair(a, a_spec, b, b_spec, g):
    """One GEMM's operands as the papers say: a shared random sign vector (when rotated), then
    each operand quantized along its last dim (the GEMM's reduction)."""
    specs = [s for s in (a_spec, b_spec) if isinstance(s, QuantSpec) and s.hadamard_random]
    signs = None
    if specs:
        signs = torch.randint(0, 2, (specs[0].hadamard_size,), generator=g).float() * 2 - 1
    out = []
    for t, spec in ((a, a_spec), (b, b_spec)):
        if isinstance(spec, QuantSpec):
            t = fake_quantize(t, spec, g if spec.stochastic else None, signs)
        out.append(t)
    return out


def _reference_gemms(paper, weight, bias, x, grad_out, g):
    """Y, dX, dW, db from plain matmuls on operands quantized along each GEMM's reduction dim."""
    x2, dy = x.reshape(TOKENS, IN), grad_out.reshape(TOKENS, OUT)
    w_q, x_q = _reference_pair(weight, paper["fwd_w"], x2, paper["fwd_x"], g)  # (out, in), (tokens, in)
    y = torch.nn.functional.linear(x_q, w_q, bias)
    dgrad_w = paper["dgrad_w"]
    dy_q, wt_q = _reference_pair(dy, paper["dgrad_dy"], weight.t(), dgrad_w, g)  # along out
    if dgrad_w == "fwd":
        wt_q = w_q.t()
    dx = dy_q @ wt_q.t()
    dyt_q, xt_q = _reference_pair(dy.t(), paper["wgrad_dy"], x2.t(), paper["wgrad_x"], g)  # along tokens
    dw = dyt_q @ xt_q.t()
    return y, dx, dw, dy.sum(0)


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_recipe_gemms_equal_the_papers_reference_gemms(name):
    streams = quant.RoundingStreams(seed=7)
    layer = _layer(_recipe(name), streams)
    x, grad_out = _operands()
    x.requires_grad_(True)
    replay = torch.Generator()
    replay.set_state(streams.generator("cpu").get_state())
    y = layer(x)
    y.backward(grad_out)
    ref_y, ref_dx, ref_dw, ref_db = _reference_gemms(
        PAPERS[name], layer.weight.detach(), layer.bias.detach(), x.detach(), grad_out, replay
    )
    assert torch.equal(y.detach().reshape(TOKENS, OUT), ref_y)
    assert torch.equal(x.grad.reshape(TOKENS, IN), ref_dx)
    assert torch.equal(layer.weight.grad, ref_dw)
    assert torch.equal(layer.bias.grad, ref_db)
    assert torch.equal(streams.generator("cpu").get_state(), replay.get_state())  # same draws, no more


def test_dgrad_and_wgrad_may_quantize_dy_differently():
    gemms = GemmSpecs(dgrad=DgradGemm(grad_output=QuantSpec("int8", group_size=32)),
                      wgrad=WgradGemm(grad_output=QuantSpec("fp4", group_size=16)))
    cfg = quant.QuantConfig(method="fake", gemms=gemms)
    layer = _layer(cfg, quant.RoundingStreams())
    x, grad_out = _operands()
    x.requires_grad_(True)
    layer(x).backward(grad_out)
    dy = grad_out.reshape(TOKENS, OUT)
    assert torch.equal(x.grad.reshape(TOKENS, IN), fake_quantize(dy, QuantSpec("int8", group_size=32)) @ layer.weight)
    dw = fake_quantize(dy.t(), QuantSpec("fp4", group_size=16)) @ x.detach().reshape(TOKENS, IN)
    assert torch.equal(layer.weight.grad, dw)
    assert not torch.equal(layer.weight.grad, fake_quantize(dy, QuantSpec("fp4", group_size=16)).t()
                           @ x.detach().reshape(TOKENS, IN))  # along out_features instead: differs


def test_simple_keys_are_the_per_gemm_common_case():
    simple = quant.QuantConfig(method="fake", weight=QuantSpec("int4"), activation=QuantSpec("mxfp4"),
                               gradient=QuantSpec("int8", group_size=32))
    plan = _layer(simple, quant.RoundingStreams()).plan
    assert plan.forward_input == QuantSpec("mxfp4").resolved()
    assert plan.forward_weight == QuantSpec("int4").resolved()
    assert plan.dgrad_grad_output == plan.wgrad_grad_output == QuantSpec("int8", group_size=32).resolved()
    assert plan.dgrad_weight is None and plan.wgrad_input is None  # the forward's W_q, X_q reused
    assert not quant.QuantConfig().gemms.explicit


def test_tiled_weight_is_reused_by_dgrad_only_when_it_is_the_same_quantization():
    tiled = QuantSpec("nvfp4", block_2d=True)
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(3))
    assert torch.equal(fake_quantize(w.t(), tiled), fake_quantize(w, tiled).t())
    reused = quant.QuantConfig(method="fake", weight=tiled, gemms=GemmSpecs(dgrad=DgradGemm(weight=tiled)))
    assert _layer(reused, quant.RoundingStreams()).plan.dgrad_weight is None
    rows = QuantSpec("nvfp4")
    fresh = quant.QuantConfig(method="fake", weight=rows, gemms=GemmSpecs(dgrad=DgradGemm(weight=rows)))
    assert _layer(fresh, quant.RoundingStreams()).plan.dgrad_weight == rows.resolved()
    assert not torch.equal(fake_quantize(w.t(), rows), fake_quantize(w, rows).t())  # 1x16: W^T differs


# ------------------------------------------------------------------------------- torchao oracles


def _torchao():
    pytest.importorskip("torchao.prototype.mx_formats")
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    def mx(t):
        return MXTensor.to_mx(t.contiguous(), torch.float4_e2m1fn_x2, 32).dequantize(torch.float32)

    def nv(t, amax=None):
        scale = per_tensor_amax_to_scale(t.abs().amax() if amax is None else amax)
        return NVFP4Tensor.to_nvfp4(t.contiguous(), per_tensor_scale=scale).dequantize(torch.float32)

    return mx, nv


def _layouts():
    """Every operand layout the recipes quantize, each with the GEMM's reduction dim last."""
    x, dy = (t.reshape(TOKENS, -1) for t in _operands())
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(2)) * 0.05
    return {"X": x, "W": w, "W^T": w.t(), "dY": dy, "dY^T": dy.t(), "X^T": x.t()}


@pytest.mark.parametrize("layout", ["X", "W", "W^T", "dY", "dY^T", "X^T"])
def test_mxfp4_and_nvfp4_agree_with_torchao_on_every_recipe_layout(layout):
    mx, nv = _torchao()
    t = _layouts()[layout]
    assert torch.equal(fake_quantize(t, QuantSpec("mxfp4")), mx(t))
    assert torch.equal(fake_quantize(t, QuantSpec("nvfp4")), nv(t))


@pytest.mark.parametrize("layout", ["W", "W^T"])
def test_nvfp4_16x16_tiles_agree_with_torchao(layout):
    """torchao has 1x16 blocks only: each element e of a tile is quantized by torchao as the block
    [e, tile amax, 0 x 14], whose block scale is then the tile's, under the tensor's global scale."""
    _, nv = _torchao()
    t = _layouts()[layout]
    rows, cols = t.shape
    tiles = t.reshape(rows // 16, 16, cols // 16, 16).abs().amax(dim=(1, 3))
    tile_amax = tiles.repeat_interleave(16, 0).repeat_interleave(16, 1)
    blocks = torch.zeros(t.numel(), 16)
    blocks[:, 0], blocks[:, 1] = t.reshape(-1), tile_amax.reshape(-1)
    expected = nv(blocks, amax=t.abs().amax())[:, 0].reshape(rows, cols)
    assert torch.equal(fake_quantize(t, QuantSpec("nvfp4", block_2d=True)), expected)


def _walsh(size: int) -> torch.Tensor:
    """H[i, j] = (-1)^popcount(i & j) / sqrt(size), in float64: the Sylvester Hadamard matrix."""
    i = torch.arange(size)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).double() / math.sqrt(size)


@pytest.mark.parametrize("size", [16, 32])
def test_hadamard_deterministic_and_random_sign_are_orthogonal_and_undone(size):
    h = _walsh(size)
    signs = torch.randint(0, 2, (size,), generator=torch.Generator().manual_seed(size)).double() * 2 - 1
    for s in (None, signs):
        rotation = h if s is None else torch.diag(s) @ h
        torch.testing.assert_close(rotation @ rotation.t(), torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-15)
        x = torch.randn(5, 3 * size, dtype=torch.float64)
        rotated = hadamard_rotate(x, size, s)
        torch.testing.assert_close(rotated, (x.reshape(5, 3, size) @ rotation).reshape(5, -1), rtol=0, atol=1e-14)
        torch.testing.assert_close(hadamard_rotate(rotated, size, s, inverse=True), x, rtol=0, atol=1e-14)
        y = torch.randn(7, 3 * size, dtype=torch.float64)  # a GEMM of two operands rotated alike
        torch.testing.assert_close(rotated @ hadamard_rotate(y, size, s).t(), x @ y.t(), rtol=0, atol=1e-12)


def test_mxfp4_in_a_random_hadamard_basis_agrees_with_torchao():
    mx, _ = _torchao()
    x = _layouts()["X^T"]
    signs = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    spec = QuantSpec("mxfp4", hadamard_size=32, hadamard_random=True)
    expected = hadamard_rotate(mx(hadamard_rotate(x, 32, signs)), 32, signs, inverse=True)
    assert torch.equal(fake_quantize(x, spec, signs=signs), expected)


# ------------------------------------------------------------------------------- stochastic rounding


def _assert_unbiased(samples: torch.Tensor, exact: torch.Tensor, sigmas: float = 6.0):
    """Every element's sample mean within `sigmas` standard errors of the exact value, plus float32
    GEMM rounding (a 6-sigma bound over ~1e4 elements fails by chance with probability < 1e-4)."""
    samples, exact = samples.double(), exact.double()
    mean, std = samples.mean(0), samples.std(0)
    bound = sigmas * std / math.sqrt(samples.shape[0]) + 1e-6 * exact.abs().max()
    assert bool(((mean - exact).abs() <= bound).all()), float(((mean - exact).abs() / bound).max())


def test_three_quarter_prescale_makes_mxfp4_stochastic_rounding_unbiased():
    x = torch.full((1, 32), 0.5)
    x[0, 0] = 7.5  # MX scale 2^(2-2) = 1: 7.5 lies above 6, where plain SR saturates (biased)
    g = torch.Generator().manual_seed(0)
    plain = torch.stack([fake_quantize(x, QuantSpec("mxfp4", stochastic=True), g) for _ in range(200)])
    assert float(plain[:, 0, 0].mean()) == 6.0  # always clipped
    spec = QuantSpec("mxfp4", stochastic=True, prescale=0.75)
    _assert_unbiased(torch.stack([fake_quantize(x, spec, g) for _ in range(2000)]), x)


def _nvfp4_saturated(t):
    """`t` clipped to +-6 times its NVFP4 block scale: the E4M3 rounding of a block scale can round
    it down, so a block's largest |x| may exceed 6 s and saturate, where no rounding is unbiased."""
    groups = t.reshape(-1, 16)
    tensor_scale, block_scale = nvfp4_scales(groups, groups.abs().amax(dim=-1, keepdim=True))
    limit = 6 * block_scale * tensor_scale
    return torch.maximum(torch.minimum(groups, limit), -limit).reshape(t.shape)


@pytest.mark.parametrize("name", ["quartet", "mxfp4_backward", "nvfp4_recipe"])
def test_backward_gemms_are_unbiased_over_the_rounding_noise(name):
    """E[dX] = dY W and E[dW] = dY^T X where the recipe's backward operands are all stochastically
    rounded (in a random Hadamard basis); NVIDIA's dgrad: E = sat(dY) W_q with its RTN 16x16 weight
    and dY's saturated block maxima (see _nvfp4_saturated)."""
    layer = _layer(_recipe(name), quant.RoundingStreams(seed=0))
    x, grad_out = _operands()
    x = x / x.abs().amax()
    x.requires_grad_(True)
    dxs, dws = [], []
    for _ in range(600):
        x.grad = layer.weight.grad = None
        layer(x).backward(grad_out)
        dxs.append(x.grad.reshape(TOKENS, IN).clone())
        dws.append(layer.weight.grad.clone())
    dy, w = grad_out.reshape(TOKENS, OUT), layer.weight.detach()
    if name == "nvfp4_recipe":
        w_q = fake_quantize(w, QuantSpec("nvfp4", block_2d=True))
        _assert_unbiased(torch.stack(dxs), _nvfp4_saturated(dy) @ w_q)
        with pytest.raises(AssertionError):  # the clipped block maxima are a real (small) bias
            _assert_unbiased(torch.stack(dxs), dy @ w_q)
    else:
        _assert_unbiased(torch.stack(dxs), dy @ w)
        _assert_unbiased(torch.stack(dws), dy.t() @ x.detach().reshape(TOKENS, IN))


# ------------------------------------------------------------------------------- resume, policy, config


def _train_steps(model, steps, seed):
    g = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        ids = torch.randint(0, TINY.vocab_size, (2, 32), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(grads)


def _converted(name, seed, rank=0):
    torch.manual_seed(0)
    model, converter = build_model(TINY), build_converter(_recipe(name))
    converter.convert(model)
    converter.seed(seed, rank)
    return model, converter


@pytest.mark.parametrize("name", ["quartet", "nvfp4_recipe"])
def test_random_hadamard_and_sr_streams_restored_exactly_on_resume(name, tmp_path):
    model, converter = _converted(name, seed=1234)
    _train_steps(model, 1, seed=0)
    torch.save(converter.state_dict(), tmp_path / "quant.pt")
    expected = _train_steps(model, 2, seed=1)

    resumed, resumed_converter = _converted(name, seed=999, rank=3)
    resumed_converter.load_state_dict(torch.load(tmp_path / "quant.pt"))
    assert torch.equal(_train_steps(resumed, 2, seed=1), expected)
    restarted, _ = _converted(name, seed=1234)  # same seed, streams not advanced: other signs/noise
    assert not torch.equal(_train_steps(restarted, 2, seed=1), expected)


def _policy_models(scope):
    cfg = _recipe("quartet")
    cfg.bf16_last_fraction, cfg.bf16_last_scope = 0.1, scope
    torch.manual_seed(0)
    model, converter = build_model(TINY), build_converter(cfg)
    converter.convert(model)
    torch.manual_seed(0)
    return cfg, model, converter, build_model(TINY)


def test_precision_policy_all_switches_forward_and_backward_for_the_last_fraction():
    cfg, model, converter, plain = _policy_models("all")
    assert cfg.high_precision_from(100) == 90 and cfg.high_precision_from(25) == 23
    ids = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    converter.set_step(89, 100)
    assert not torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    converter.set_step(90, 100)
    assert torch.equal(_train_steps(model, 1, seed=0), _train_steps(plain, 1, seed=0))
    assert "bf16 forward and backward for the last 10% of steps" in converter.describe()


def test_precision_policy_forward_keeps_the_quantized_backward():
    _, model, converter, plain = _policy_models("forward")
    _, reference, reference_converter, _ = _policy_models("forward")  # the same model, quantized throughout
    ids = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    converter.set_step(90, 100)
    assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    switched = _train_steps(model, 1, seed=0)
    assert not torch.equal(switched, _train_steps(plain, 1, seed=0))  # dX and dW stay quantized
    # Only the forward changed: the backward GEMMs drew the same signs and noise as a fully quantized
    # step, so the gradients differ from that step's by the forward's activations alone; with the
    # forward quantized again (step 89) the two models agree bit for bit.
    assert not torch.equal(switched, _train_steps(reference, 1, seed=0))
    converter.set_step(89, 100)
    assert torch.equal(_train_steps(model, 1, seed=5), _train_steps(reference, 1, seed=5))
    assert "bf16 forward for the last 10% of steps" in converter.describe()


def test_nvfp4_recipe_keeps_the_last_15_percent_of_blocks_and_lm_head_in_high_precision():
    model = build_model(replace(TINY, num_hidden_layers=12))
    build_converter(_recipe("nvfp4_recipe")).convert(model)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert {int(n.split(".")[2]) for n in quantized} == set(range(10))  # round(0.15 x 12) = 2 kept
    assert len(quantized) == 10 * 7 and type(model.lm_head) is nn.Linear


@pytest.mark.parametrize(
    "change,key",
    [
        ({"gemms": {"wgrad": {"input": {"format": "nf4"}}}}, "gemms.wgrad.input: format"),
        ({"gemms": {"dgrad": {"grad_output": {"format": "mxfp4", "group_size": 16}}}}, "gemms.dgrad.grad_output"),
        ({"gemms": {"wgrad": {"input": {"hadamard_random": False}}}}, "quant.gemms.wgrad: grad_output"),
        ({"gradient": {"format": "int4", "prescale": 0.75}}, "gradient: prescale"),
        ({"gemms": {"forward": {"input": {"format": "mxfp4", "hadamard_random": True}}}}, "hadamard_random"),
        ({"bf16_last_fraction": 1.5}, "quant.bf16_last_fraction"),
        ({"bf16_last_scope": "backward"}, "quant.bf16_last_scope"),
        ({"keep_last_fraction": -0.1}, "quant.keep_last_fraction"),
        ({"estimator": "clipped_ste", "weight": {"format": "mxfp4", "hadamard_size": 32,
                                                  "hadamard_random": True}}, "clipped_ste"),
    ],
)
def test_bad_per_gemm_settings_fail_with_one_line_naming_the_key(change, key):
    base = quant_yaml("nvfp4_recipe")
    with pytest.raises(QuantConfigError, match=key) as error:
        to_quant_config(OmegaConf.merge(base, change))
    assert "\n" not in str(error.value)


def test_a_single_per_gemm_field_is_set_from_the_command_line(quant_hydra):
    from hydra import compose

    cfg = to_quant_config(compose(config_name="nvfp4", overrides=["gemms.wgrad.input.format=int8"]))
    assert cfg.gemms.wgrad.input == QuantSpec("int8") and cfg.gemms.explicit
    with pytest.raises(QuantConfigError, match="gemms.dgrad.weight: fields set on an inherited slot"):
        to_quant_config(compose(config_name="nvfp4", overrides=["gemms.dgrad.weight.stochastic=true"]))


def test_unknown_per_gemm_key_is_refused():
    with pytest.raises(QuantConfigError, match="inputs"):
        to_quant_config({"method": "fake", "gemms": {"wgrad": {"inputs": {"format": "nvfp4"}}}})


@pytest.mark.usefixtures("keep_signal_handlers")  # train() installs preemption handlers
def test_train_resumes_a_quartet_run_with_the_precision_policy_exactly(tmp_path, tiny_config, capsys):
    """Through train.py: random signs and SR noise restored from the checkpoint (step 5) and the
    bf16 phase (step 6 of 6 here) switched on by step, so steps 5-6 after a resume from step 4
    match the uninterrupted run."""
    import json
    import shutil

    import train

    overrides = ("quant=quartet", "quant.bf16_last_fraction=0.17", "checkpoint.keep_last=3")
    train.train(tiny_config(tmp_path / "reference", *overrides))

    def losses(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    expected = losses(tmp_path / "reference")
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    shutil.copytree(tmp_path / "reference", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000006")
    capsys.readouterr()
    train.train(tiny_config(tmp_path / "resumed", *overrides))
    assert "resumed from step_00000004 at step 4;" in capsys.readouterr().out
    assert losses(tmp_path / "resumed") == expected
