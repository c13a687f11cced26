"""Every optimizer and quantization config trains through train.py on the sample corpus."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import train
from quant import QuantConfigError

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = sorted(p.stem for p in (ROOT / "configs" / "optimizer").glob("*.yaml"))
QUANTS = sorted(p.stem for p in (ROOT / "configs" / "quant").glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("keep_signal_handlers")  # train() installs preemption handlers


def short_run(run_dir: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=llama_tiny", "data=sample", "trainer.precision=fp32", "trainer.cpu=true", "logging.wandb_mode=disabled", "logging.progress=lines",
            "data.seq_len=32", "data.val_tokens=128", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
            "trainer.max_steps=3", "trainer.warmup_steps=1", "trainer.eval_every=3", "trainer.eval_at_start=true",
            "checkpoint.every=0", "checkpoint.export_hf=false", f"run_dir={run_dir}", *overrides,
        ])
    return train.train(cfg)


def assert_trained(results: dict) -> None:
    assert results["step"] == 3
    assert math.isfinite(results["val_loss"]) and results["val_loss"] < results["initial_val_loss"]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_trains(tmp_path, optimizer):
    # Stable-SPAM's and SPAM's published learning rates are for 20k-step runs; the quickstart's 3e-3
    # is what every optimizer here gets, so the test compares like with like.
    assert_trained(short_run(tmp_path, f"optimizer={optimizer}", "optimizer.lr=3e-3", "quant=none"))


@pytest.mark.parametrize("quant", [q for q in QUANTS if q != "fp8"])
def test_each_quant_format_trains(tmp_path, quant):
    assert_trained(short_run(tmp_path, f"quant={quant}", "optimizer=adamw", "optimizer.lr=3e-3"))


def test_fp8_refuses_on_cpu_with_its_message(tmp_path):
    with pytest.raises(QuantConfigError, match="needs a CUDA GPU"):
        short_run(tmp_path, "quant=fp8", "optimizer=adamw")
