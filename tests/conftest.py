"""Test-wide settings: no stray hub calls, one intra-op CPU thread, offline wandb; shared fixtures.

One thread (here and, through OMP_NUM_THREADS, in every process a test launches): the tests run
tiny models whose ops cost less than the threads' hand-offs, and on a shared 2-core machine two
threads per process made tests/test_train_resume.py take 347 s instead of 65 s (back to back, loaded; 30 s instead of 24 s on a quiet machine).
"""
import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS, which it reads at import)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def keep_signal_handlers():
    """Restore the SIGTERM/SIGUSR1 handlers that an in-process `train()` installs for preemption."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


TINY_OVERRIDES = [
    "+experiment=quickstart", "trainer.cpu=true", "logging.wandb_mode=disabled", "logging.progress=lines",
    "data.seq_len=32", "data.val_tokens=1024", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
    "trainer.max_steps=6", "trainer.warmup_steps=1", "trainer.eval_at_start=false", "trainer.log_every=1",
    "checkpoint.every=2", "checkpoint.export_hf=false",
]


@pytest.fixture
def tiny_config():
    """Compose the few-second in-process run: `tiny_config(run_dir, *overrides)`."""
    from hydra import compose, initialize_config_dir

    configs = str(Path(__file__).resolve().parents[1] / "configs")

    def make(run_dir, *overrides: str):
        with initialize_config_dir(config_dir=configs, version_base="1.3"):
            return compose(config_name="config", overrides=[*TINY_OVERRIDES, f"run_dir={run_dir}", *overrides])

    return make


@pytest.fixture
def quant_hydra():
    """Hydra initialised on configs/quant/, so a test can `compose(config_name="nvfp4", ...)` one format."""
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    import quant
    from quant_support import CONFIG_DIR

    cs = ConfigStore.instance()
    quant.register_configs(cs)
    # The group's yamls name `quant_schema`; composing them standalone needs it at the root too.
    cs.store(name="quant_schema", node=quant.QuantConfig)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()
