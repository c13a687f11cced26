"""Non-finite losses: stop with a message and keep the last checkpoint, or skip the update."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import train

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("keep_signal_handlers")  # train() installs preemption handlers


def tiny_config(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=[
            "+experiment=quickstart", "trainer.cpu=true", "logging.wandb_mode=disabled", "logging.progress=lines",
            "data.seq_len=32", "data.val_tokens=1024", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
            "trainer.max_steps=6", "trainer.warmup_steps=1", "trainer.eval_at_start=false", "trainer.log_every=1",
            "checkpoint.every=2", "checkpoint.export_hf=false", f"run_dir={run_dir}", *overrides,
        ])


def poison_step(monkeypatch, bad_step: int) -> None:
    """Make the loss of one optimizer step NaN (micro-batches are counted from 1)."""
    real = train.token_loss_sum
    calls = {"train": 0}

    def loss_with_nan(model, batch):
        loss = real(model, batch)
        if model.training:
            calls["train"] += 1
            if calls["train"] == bad_step:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train, "token_loss_sum", loss_with_nan)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_step(monkeypatch, bad_step=3)
    with pytest.raises(train.NonFiniteLossError, match="step 3.*step_00000002"):
        train.train(tiny_config(tmp_path))
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == ["step_00000002"]


def test_skip_policy_drops_the_bad_update_and_finishes(tmp_path, monkeypatch):
    poison_step(monkeypatch, bad_step=3)
    results = train.train(tiny_config(tmp_path, "trainer.nonfinite_policy=skip"))
    assert results["step"] == 6 and math.isfinite(results["val_loss"])
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r.get("skipped_step")]
    assert skipped == [3]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lrs[3] == lrs[2], "the LR schedule must not advance on a skipped step"
    assert torch.isfinite(torch.tensor([r["loss"] for r in records if "loss" in r and r["step"] != 3])).all()
