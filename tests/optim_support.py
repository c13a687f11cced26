"""Shared by the optimizer tests (imported by name: pytest puts tests/ on sys.path): a 1-layer LLaMA
shape and the composed `optimizer` node of a yaml with overrides, as train.py would see it."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra

from models import ModelConfig
from stablespam import register_configs

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TINY = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                   vocab_size=64)


def compose_optimizer(name: str, *overrides: str):
    register_configs(ConfigStore.instance())
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=None, overrides=[f"+optimizer={name}", *overrides]).optimizer
