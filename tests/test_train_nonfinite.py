"""Non-finite losses: stop with a message and keep the last checkpoint, or skip the update."""
from __future__ import annotations

import json
import math

import pytest
import torch

import train
import trainer.step
from trainer.schedule import WarmupDecay

pytestmark = pytest.mark.usefixtures("keep_signal_handlers")  # train() installs preemption handlers


def scale_step(monkeypatch, bad_step: int, factor: float) -> None:
    """Multiply the loss (and so the gradient) of one optimizer step by `factor` (micro-batches are
    counted from 1)."""
    real = trainer.step.token_loss_sum
    calls = {"train": 0}

    def scaled_loss(model, batch):
        loss = real(model, batch)
        if model.training:
            calls["train"] += 1
            if calls["train"] == bad_step:
                return loss * factor
        return loss

    monkeypatch.setattr(trainer.step, "token_loss_sum", scaled_loss)


def poison_step(monkeypatch, bad_step: int) -> None:
    """Make the loss of one optimizer step NaN."""
    scale_step(monkeypatch, bad_step, float("nan"))


@pytest.mark.parametrize("log_every", [1, 4])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, tiny_config, log_every):
    """Found without a per-step sync: on the next logging step or before the next save, whichever is first."""
    poison_step(monkeypatch, bad_step=3)
    with pytest.raises(train.NonFiniteLossError, match="step 3.*step_00000002"):
        train.train(tiny_config(tmp_path, f"trainer.log_every={log_every}"))
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == ["step_00000002"]


def test_skipped_step_is_not_an_optimizer_step(tmp_path, monkeypatch, tiny_config):
    poison_step(monkeypatch, bad_step=3)
    cfg = tiny_config(tmp_path, "trainer.nonfinite_policy=skip", "trainer.warmup_steps=2")
    results = train.train(cfg)
    assert results["step"] == 6 and math.isfinite(results["val_loss"])
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped_step")] == [3]
    taken = {r["step"]: r for r in records if "lr" in r}
    assert sorted(taken) == [1, 2, 3, 4, 5, 6], "six optimizer steps were taken, the skip is not one"
    schedule = WarmupDecay.from_config(cfg.trainer)
    for step, record in taken.items():
        assert record["lr"] == pytest.approx(cfg.optimizer.lr * schedule(step - 1), rel=1e-12)
    assert taken[6]["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) for r in taken.values())
    optimizer = torch.load(tmp_path / "checkpoints" / "step_00000006" / "optimizer.pt", weights_only=False)
    assert optimizer["param_groups"][0]["global_step"] == 6, "Stable-SPAM's counter follows the steps taken"



SPIKE_RUN = ["trainer.spike_policy=skip", "trainer.spike_window=3", "trainer.spike_z=6", "trainer.max_steps=8",
             "checkpoint.every=0", "trainer.quant_error_every=0"]


def test_spike_policy_skips_an_injected_spike_and_nothing_else(tmp_path, monkeypatch, tiny_config):
    scale_step(monkeypatch, bad_step=6, factor=50.0)
    results = train.train(tiny_config(tmp_path, *SPIKE_RUN))
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [(r["step"], r["skip_reason"]) for r in records if r.get("skipped_step")]
    assert skipped == [(6, "loss/grad-norm spike")]
    assert results["step"] == 8 and max(r["step"] for r in records if "lr" in r) == 8
    assert [r for r in records if r["step"] == 8 and "lr" in r][0]["spike_skips"] == 1


def test_spike_policy_leaves_an_ordinary_run_alone(tmp_path, tiny_config):
    reference = tmp_path / "reference"
    train.train(tiny_config(reference, "trainer.max_steps=8", "checkpoint.every=0", "trainer.quant_error_every=0"))
    train.train(tiny_config(tmp_path / "policy", *SPIKE_RUN))
    losses = {}
    for run in (reference, tmp_path / "policy"):
        records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        assert not any(r.get("skipped_step") for r in records)
        losses[run.name] = [r["loss"] for r in records if "loss" in r]
    assert losses["policy"] == losses["reference"]
