"""Non-finite losses: stop with a message and keep the last checkpoint, or skip the update."""
from __future__ import annotations

import json
import math
import shutil

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


def test_a_skipped_update_uses_up_its_batch_and_schedule_position(tmp_path, monkeypatch, tiny_config):
    """Step 3's update is skipped on the device: the step counter and the LR schedule go on, the
    skip is counted and logged on the logging step, and the optimizer's update counters do not move."""
    poison_step(monkeypatch, bad_step=3)
    cfg = tiny_config(tmp_path, "trainer.nonfinite_policy=skip", "trainer.warmup_steps=2")
    results = train.train(cfg)
    assert results["step"] == 6 and math.isfinite(results["val_loss"])
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
               if "lr" in r}
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    schedule = WarmupDecay.from_config(cfg.trainer)
    for step, record in records.items():
        assert record["lr"] == pytest.approx(cfg.optimizer.lr * schedule(step - 1), rel=1e-12)
        assert record["window_skipped"] == (step == 3)
        assert record["skipped_steps"] == (step >= 3) and record["spike_skips"] == 0
        assert record["last_skipped_step"] == (3 if step >= 3 else -1)
        assert (record["loss"] is None) == (step == 3), "a window without an update taken has no loss"
    optimizer = torch.load(tmp_path / "checkpoints" / "step_00000006" / "optimizer.pt", weights_only=False)
    assert optimizer["param_groups"][0]["global_step"] == 6, "Stable-SPAM's schedule counts every step"
    assert {float(s["step"]) for s in optimizer["state"].values()} == {5.0}, "five updates were taken"


def test_too_many_skips_in_a_row_stop_on_the_logging_step(tmp_path, monkeypatch, tiny_config):
    for bad in (3, 4):
        poison_step(monkeypatch, bad_step=bad)
    with pytest.raises(train.NonFiniteLossError, match="2 updates skipped in a row .the last at step 4"):
        train.train(tiny_config(tmp_path, "trainer.nonfinite_policy=skip", "trainer.max_consecutive_skips=1",
                                "trainer.log_every=4"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]


SPIKE_RUN = ["trainer.spike_policy=skip", "trainer.spike_window=3", "trainer.spike_z=6", "trainer.max_steps=8",
             "checkpoint.every=0", "trainer.quant_error_every=0"]


def test_spike_policy_skips_an_injected_spike_and_nothing_else(tmp_path, monkeypatch, tiny_config):
    scale_step(monkeypatch, bad_step=6, factor=50.0)
    results = train.train(tiny_config(tmp_path, *SPIKE_RUN))
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
               if "lr" in r}
    assert results["step"] == 8 and sorted(records) == list(range(1, 9))
    assert [s for s, r in records.items() if r["window_skipped"]] == [6]
    assert records[6]["last_skipped_step"] == 6
    assert records[8]["spike_skips"] == records[8]["skipped_steps"] == 1


def test_spike_policy_leaves_an_ordinary_run_alone(tmp_path, tiny_config):
    reference = tmp_path / "reference"
    train.train(tiny_config(reference, "trainer.max_steps=8", "checkpoint.every=0", "trainer.quant_error_every=0"))
    train.train(tiny_config(tmp_path / "policy", *SPIKE_RUN))
    losses = {}
    for run in (reference, tmp_path / "policy"):
        records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        assert not any(r.get("skipped_steps") for r in records)
        losses[run.name] = [r["loss"] for r in records if "loss" in r]
    assert losses["policy"] == losses["reference"]


def test_a_checkpoint_at_a_skipped_step_resumes_like_the_uninterrupted_run(tmp_path, monkeypatch, tiny_config):
    poison_step(monkeypatch, bad_step=4)
    skip = ("trainer.nonfinite_policy=skip", "trainer.spike_policy=skip", "trainer.spike_window=2")
    train.train(tiny_config(tmp_path / "straight", *skip))
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000006")  # resume at step 4, skipped
    train.train(tiny_config(tmp_path / "resumed", *skip))
    logged = {}
    for run in ("resumed", "straight"):
        rows = map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
        logged[run] = {r["step"]: (r["loss"], r["skipped_steps"], r["last_skipped_step"]) for r in rows if "lr" in r}
    assert logged["resumed"] == logged["straight"] and logged["straight"][4][2] == 4
