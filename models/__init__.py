"""LLaMA model family built on `transformers`' LlamaForCausalLM (SDPA attention).

We use the Hugging Face implementation rather than our own so that checkpoints export with
`save_pretrained` and load anywhere in the ecosystem; the quantization package converts its
`nn.Linear` modules by name, so nothing model-specific is needed here.
"""
from models.llama import ModelConfig, build_model, count_parameters, matmul_flops_per_token

__all__ = ["ModelConfig", "build_model", "count_parameters", "matmul_flops_per_token"]
