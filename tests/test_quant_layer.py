"""QuantLinear, the model converter, resume of stochastic rounding, and the Hydra configs."""
import pytest
import torch
from hydra import compose
from torch import nn

import quant
from models import ModelConfig, build_model
from quant import (
    PROJECTIONS,
    Fp8UnavailableError,
    QuantConfigError,
    QuantLinear,
    QuantSpec,
    build_converter,
    fake_quantize,
)
from quant_support import CONFIG_DIR, quant_yaml

ALL_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
TINY = ModelConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                   num_attention_heads=4, vocab_size=8192)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model(TINY)


# ------------------------------------------------------------------------------- layer


def test_straight_through_gradients_use_quantized_operands():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    spec = QuantSpec("int4", group_size=32)
    layer = QuantLinear.from_linear(linear, weight_spec=spec, activation_spec=spec)
    x = torch.randn(5, 64, requires_grad=True)
    grad_out = torch.randn(5, 32)
    layer(x).backward(grad_out)
    w_q, x_q = fake_quantize(linear.weight.detach(), spec), fake_quantize(x.detach(), spec)
    assert torch.allclose(x.grad, grad_out @ w_q, atol=1e-5)  # dX = G W_q, passed through
    assert torch.allclose(linear.weight.grad, grad_out.t() @ x_q, atol=1e-5)  # dW = G^T X_q
    assert torch.allclose(linear.bias.grad, grad_out.sum(0))
    assert torch.allclose(layer(x), x_q @ w_q.t() + linear.bias, atol=1e-5)


def test_clipped_ste_zeroes_gradient_of_clipped_inputs():
    torch.manual_seed(0)
    x = torch.randn(4, 32) * 0.1
    x[:, 0] = 10.0  # amax 10 -> MX scale 2: |x|/scale = 5 fits, then force a clip:
    x[:, 1] = 7.5  # 7.5 / 2 = 3.75 fits ...
    x[:, 0] = 15.0  # ... amax 15 -> scale 2: 15/2 = 7.5 > 6 saturates (clipped)
    x.requires_grad_(True)
    layer = QuantLinear(32, 1, bias=False, activation_spec=QuantSpec("mxfp4"), estimator="clipped_ste")
    layer(x).sum().backward()
    expected = layer.weight.detach().expand(4, 32).clone()
    expected[:, 0] = 0.0
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize(
    "dtype,bias,lead",
    [(torch.float32, True, (12,)), (torch.float32, False, (2, 6)), (torch.bfloat16, True, (2, 6))],
)
def test_three_gemms_match_a_per_gemm_reference(dtype, bias, lead):
    torch.manual_seed(0)
    linear = nn.Linear(32, 48, bias=bias).to(dtype)
    w_spec, a_spec = QuantSpec("int4", group_size=16), QuantSpec("mxfp4")
    g_spec = QuantSpec("int4", group_size=8)  # 12 tokens: a full group and a partial one
    layer = QuantLinear.from_linear(linear, weight_spec=w_spec, activation_spec=a_spec,
                                    gradient_spec=g_spec)
    x = torch.randn(*lead, 32, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(*lead, 48, dtype=dtype)
    out = layer(x)
    out.backward(grad_out)

    # Reference: each GEMM's operands quantized along that GEMM's reduction dimension.
    w_q = fake_quantize(linear.weight.detach(), w_spec)  # (out, in) along in
    x_q = fake_quantize(x.detach().reshape(12, 32), a_spec)  # (tokens, in) along in
    g = grad_out.reshape(12, 48)
    g_dgrad = fake_quantize(g, g_spec)  # (tokens, out) along out
    g_wgrad = fake_quantize(g.t().contiguous(), g_spec)  # (out, tokens) along tokens
    expected_out = x_q @ w_q.t() + (linear.bias.detach() if bias else 0)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(out.detach().reshape(12, 48), expected_out.to(dtype), **tol)
    torch.testing.assert_close(x.grad.reshape(12, 32), g_dgrad @ w_q, **tol)
    torch.testing.assert_close(linear.weight.grad, g_wgrad @ x_q, **tol)
    if bias:
        torch.testing.assert_close(linear.bias.grad, g.sum(0), **tol)  # unquantized G
    assert x.grad.dtype == linear.weight.grad.dtype == dtype


def test_wgrad_quantizes_gradient_groups_along_tokens():
    # Token 0 has a large gradient on every output. Grouped along the tokens (wgrad), each
    # output channel's scale is 100/7, so token 1's small entries round to zero; grouped along
    # out_features (dgrad), token 1 has its own scale and survives.
    g = torch.tensor([[100.0, 100.0, 100.0], [1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    spec = QuantSpec("int4", group_size=-1)
    layer = QuantLinear(3, 3, bias=False, gradient_spec=spec)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(3))
    x = torch.eye(3, requires_grad=True)  # tokens x in_features, so dW = q_wgrad(G)^T
    layer(x).backward(g)
    along_tokens = fake_quantize(g.t(), spec)
    along_out = fake_quantize(g, spec).t()
    assert not torch.equal(along_tokens, along_out)
    assert torch.equal(layer.weight.grad, along_tokens)
    assert torch.equal(layer.weight.grad[:, 1], torch.zeros(3))
    assert torch.equal(x.grad, fake_quantize(g, spec))  # dX = q_dgrad(G) W, W = I
    assert torch.all(x.grad[1] != 0)


def test_official_weight_ste_is_the_official_expression():
    torch.manual_seed(0)
    linear = nn.Linear(256, 8, bias=False).to(torch.bfloat16)
    spec = QuantSpec("int4_official", grouping="flat", symmetric=False)
    layer = QuantLinear.from_linear(linear, weight_spec=spec)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    q = fake_quantize(linear.weight.detach(), spec)
    official_weight = q.detach() + linear.weight - linear.weight.detach()
    assert torch.equal(layer(x), x @ official_weight.t())


# ------------------------------------------------------------------------------- converter


def test_converter_swaps_exactly_the_projection_linears():
    model = _tiny_model()
    keys_before = list(model.state_dict().keys())
    params_before = {n: p for n, p in model.named_parameters()}
    converter = build_converter(quant_yaml("int4"))
    converter.convert(model)
    swapped = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    expected = {f"model.layers.{i}.{part}.{p}" for i in range(2) for p in PROJECTIONS
                for part in ("self_attn", "mlp") if (part == "self_attn") == (p in PROJECTIONS[:4])}
    assert swapped == expected and len(expected) == 14
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert list(model.state_dict().keys()) == keys_before
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert converter.describe() == "int4 W(int4,g128,sym,RTN) A(int4,g128,sym,RTN) ste on 14/15 linears"


def test_converter_keeps_first_and_last_blocks_and_excluded_names():
    cfg = quant_yaml("int4")
    cfg.keep_first_blocks = 1
    model = _tiny_model()
    build_converter(cfg).convert(model)
    swapped = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert swapped and all(n.startswith("model.layers.1.") for n in swapped)
    cfg = quant_yaml("int4")
    cfg.keep_last_blocks = 1
    cfg.exclude_modules = ["*.mlp.down_proj"]
    model = _tiny_model()
    build_converter(cfg).convert(model)
    swapped = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(swapped) == 6 and all(n.startswith("model.layers.0.") for n in swapped)


def test_none_converts_nothing_and_fp8_refuses_on_cpu():
    model = _tiny_model()
    build_converter(quant_yaml("none")).convert(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(Fp8UnavailableError, match=r"sm_89\+\); this run is on CPU"):
        build_converter(quant_yaml("fp8")).convert(_tiny_model())


def _sr_config():
    cfg = quant_yaml("int4")
    cfg.weight.stochastic = True
    cfg.activation.stochastic = True
    cfg.gradient = {"format": "int8", "stochastic": True}
    return cfg


def _train_steps(model, steps, seed):
    """Forward + backward (the gradient quantizer draws noise too); losses and grads per step."""
    g = torch.Generator().manual_seed(seed)
    losses, grads = [], []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        ids = torch.randint(0, TINY.vocab_size, (2, 16), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(losses), torch.stack(grads)


def test_stochastic_rounding_reproduced_exactly_after_resume(tmp_path):
    model, converter = _tiny_model(), build_converter(_sr_config())
    converter.convert(model)
    converter.seed(1234, rank=0)
    _train_steps(model, 2, seed=0)
    torch.save(converter.state_dict(), tmp_path / "quant.pt")
    expected_losses, expected_grads = _train_steps(model, 2, seed=1)

    resumed, resumed_converter = _tiny_model(), build_converter(_sr_config())
    resumed_converter.convert(resumed)
    resumed_converter.seed(999, rank=3)  # overwritten by the checkpoint
    resumed_converter.load_state_dict(torch.load(tmp_path / "quant.pt"))
    losses, grads = _train_steps(resumed, 2, seed=1)
    assert torch.equal(losses, expected_losses) and torch.equal(grads, expected_grads)

    fresh, other = build_converter(_sr_config()), _tiny_model()
    fresh.convert(other)
    fresh.seed(1234, rank=0)  # same seed, but the stream restarts: different noise
    assert not torch.equal(_train_steps(other, 2, seed=1)[1], expected_grads)


def test_seed_gives_distinct_streams_per_rank_reproducibly():
    def draws(seed, rank):
        converter = build_converter(_sr_config())
        converter.seed(seed, rank)
        return torch.rand(4, generator=converter.streams.generator("cpu"))

    assert torch.equal(draws(0, 0), draws(0, 0))
    assert not torch.equal(draws(0, 0), draws(0, 1))
    assert not torch.equal(draws(0, 0), draws(1, 0))


# ------------------------------------------------------------------------------- configs


def test_expected_configs_exist():
    assert set(ALL_CONFIGS) == {"none", "int4", "int8", "fp4", "mxfp4", "nvfp4",
                                "int4_official", "fp4_official", "fp8",
                                "nvfp4_recipe", "quartet", "mxfp4_backward"}


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_yaml_composes_against_schema_and_builds(name, quant_hydra):
    cfg = compose(config_name=name)
    assert cfg.name == name
    converter = build_converter(cfg)
    if name != "fp8":
        model = _tiny_model()
        converter.convert(model)
        ids = torch.randint(0, TINY.vocab_size, (1, 16))
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_typo_or_bad_value_fails_with_hydra_or_clear_message(quant_hydra):
    with pytest.raises(Exception, match="formatt"):
        compose(config_name="int4", overrides=["weight.formatt=int4"])
    with pytest.raises(Exception, match="group_size"):
        compose(config_name="int4", overrides=["weight.group_size=abc"])
    with pytest.raises(QuantConfigError, match="nf4"):
        build_converter(compose(config_name="int4", overrides=["weight.format=nf4"]))
    with pytest.raises(QuantConfigError, match="estimator"):
        build_converter(compose(config_name="int4", overrides=["estimator=lsq"]))


def test_eval_rounds_to_nearest_and_leaves_the_streams_alone():
    model, converter = _tiny_model(), build_converter(_sr_config())
    converter.convert(model)
    converter.seed(1234, rank=0)
    reference = _tiny_model()  # same weights, round-to-nearest everywhere
    rtn = quant_yaml("int4")
    rtn.gradient = {"format": "int8"}
    build_converter(rtn).convert(reference)
    ids = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))

    def streams_state():
        return converter.streams.state_dict()["generator_states"]["cpu"]

    model.train()
    model(input_ids=ids)  # creates the CPU stream, advances it
    before = streams_state()
    model.eval()
    with torch.no_grad():
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(streams_state(), before)
    assert torch.equal(first, second)
    assert torch.equal(first, reference.eval()(input_ids=ids).logits)
    model.train()
    model(input_ids=ids)
    assert not torch.equal(streams_state(), before)


@pytest.mark.parametrize("name", ["int4", "int8", "fp4", "mxfp4", "nvfp4", "int4_official", "fp4_official"])
def test_python_spec_defaults_are_the_yaml_configs(name, quant_hydra):
    cfg = quant.converter.to_quant_config(compose(config_name=name))
    # The yamls' only role-specific choices: the official asymmetric weight quantizer and
    # NVFP4's 16x16 weight tiles (NVIDIA's recipe; activations use 1x16 blocks).
    weight = {"int4_official": QuantSpec(name, symmetric=False),
              "nvfp4": QuantSpec(name, block_2d=True)}.get(name, QuantSpec(name))
    assert cfg.weight.resolved() == weight.resolved()
    assert cfg.activation.resolved() == QuantSpec(name).resolved()


def test_official_format_defaults_are_the_official_layout():
    for spec in (QuantSpec("fp4_official"), QuantSpec("int4_official")):
        resolved = spec.resolved()
        assert (resolved.group_size, resolved.grouping, resolved.outlier_topk) == (256, "flat", 2)
    assert QuantSpec("int4_official", symmetric=False).resolved().outlier_topk == 0
    assert QuantSpec("fp4_official").summary() == "fp4_official,g256,flat,top2,RTN"
    assert QuantSpec("int4").resolved() == QuantSpec("int4", group_size=128, grouping="k", outlier_topk=0)
