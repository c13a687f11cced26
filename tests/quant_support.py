"""Shared by the quant tests: the configs/quant yamls as plain nodes, and a short AdamW training run
of a converted model that reports its losses (eager or compiled, any device)."""
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from models import ModelConfig, build_model
from quant import build_converter

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "quant"


def quant_yaml(name: str) -> DictConfig:
    """configs/quant/<name>.yaml without its Hydra defaults list (the schema is applied by the caller)."""
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    cfg.pop("defaults")
    return cfg


def training_losses(model_config: ModelConfig, quant: str, precision: str, steps: int, batches: torch.Tensor,
                    device: str = "cpu", compiled: bool = False, lr: float = 3e-3) -> torch.Tensor:
    """AdamW losses of `steps` steps cycling through `batches` (n, rows, seq), from seed-0 weights.

    Dynamo is reset first: a fresh compile per case, never the recompile limit's eager fallback.
    """
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(model_config, torch.bfloat16 if precision == "pure_bf16" else torch.float32)
    build_converter(quant_yaml(quant)).convert(model.to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    run = torch.compile(model) if compiled else model
    losses = []
    for step in range(steps):
        ids = batches[step % len(batches)].to(device)
        with torch.autocast(device, torch.bfloat16, enabled=precision == "bf16_mixed"):
            loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses)
