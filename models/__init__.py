"""LLaMA model family built on `transformers`' LlamaForCausalLM (SDPA attention).

We use the Hugging Face implementation rather than our own so that checkpoints export with
`save_pretrained` and load anywhere in the ecosystem; the quantization package converts its
`nn.Linear` modules by name, so nothing model-specific is needed here.
"""
import logging

# transformers imports torchao when it is installed; on CPU-only torch builds torchao logs a warning
# per CUDA extension it cannot load, and torch warns about torchao's pytree registrations. Neither
# affects training, and both would bury a run's own output.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from models.llama import ModelConfig, build_model, count_parameters, matmul_flops_per_token  # noqa: E402

__all__ = ["ModelConfig", "build_model", "count_parameters", "matmul_flops_per_token"]
