"""Model shapes against the papers' Table 5 and the FLOP count used for MFU."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from models import ModelConfig, build_model, count_parameters, matmul_flops_per_token

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"

# Parameter counts from shared/reference/paper-results.md (vocab 32000, untied head).
PAPER_PARAMS = {"llama_60m": 58.1e6, "llama_130m": 134.1e6, "llama_350m": 368.0e6, "llama_1b": 1.34e9}


def load_model_config(name: str) -> ModelConfig:
    raw = OmegaConf.load(CONFIGS / f"{name}.yaml")
    raw.pop("defaults")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_paper_table(name):
    cfg = load_model_config(name)
    with torch.device("meta"):
        model = build_model(cfg)
    assert abs(count_parameters(model) / PAPER_PARAMS[name] - 1) < 0.005
    assert cfg.hidden_size // cfg.num_attention_heads == 64


def test_tiny_model_runs_forward_and_uses_sdpa():
    cfg = load_model_config("llama_tiny")
    model = build_model(cfg)
    assert model.config._attn_implementation == "sdpa"
    logits = model(input_ids=torch.randint(0, cfg.vocab_size, (2, 16))).logits
    assert logits.shape == (2, 16, cfg.vocab_size)


def test_flops_per_token_counts_every_matmul_weight():
    cfg = load_model_config("llama_130m")
    with torch.device("meta"):
        model = build_model(cfg)
    matmul_weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight") or n == "lm_head.weight")
    seq = 256
    expected = 6 * matmul_weights + 12 * cfg.num_hidden_layers * seq * cfg.hidden_size
    assert matmul_flops_per_token(cfg, seq) == expected
