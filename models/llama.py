"""Typed model config and builder for the GaLore-shaped LLaMA sizes used by both papers."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass
class ModelConfig:
    """Shape of a LLaMA model (paper Table 5). `name` is informational and names the run."""

    name: str = "llama_tiny"
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    vocab_size: int = 32000
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attn_implementation: str = "sdpa"


def to_hf_config(cfg: ModelConfig) -> LlamaConfig:
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"model.hidden_size={cfg.hidden_size} is not divisible by "
            f"model.num_attention_heads={cfg.num_attention_heads}"
        )
    return LlamaConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.initializer_range,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu",
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
        use_cache=False,
        attn_implementation=cfg.attn_implementation,
    )


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A freshly initialised model (std `initializer_range`), on CPU, in `dtype`."""
    model = LlamaForCausalLM(to_hf_config(cfg))
    return model.to(dtype)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matmul_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N_matmul + 12 L T d (attention scores and values).

    N_matmul counts every matmul weight including lm_head but not the embedding lookup, as in
    shared/reference/performance-anchors.md.
    """
    d, f, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv_dim = d // cfg.num_attention_heads * (cfg.num_key_value_heads or cfg.num_attention_heads)
    per_layer = d * d * 2 + d * kv_dim * 2 + 3 * d * f
    n_matmul = n_layers * per_layer + d * cfg.vocab_size
    return 6.0 * n_matmul + 12.0 * n_layers * seq_len * d
