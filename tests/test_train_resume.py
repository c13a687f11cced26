"""Resume follows the config: changed settings are applied and reported, impossible ones refused,
corrupt checkpoints fall back, fresh runs never mix with old ones, metrics have no replayed rows."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train
from trainer.config import ConfigError
from trainer.schedule import WarmupDecay

pytestmark = pytest.mark.usefixtures("keep_signal_handlers")  # train() installs preemption handlers


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records(run_dir) if key in r}


def test_resume_with_a_new_lr_and_max_steps_follows_the_new_schedule(tmp_path, tiny_config, capsys):
    train.train(tiny_config(tmp_path, "trainer.max_steps=6", "optimizer.lr=3e-3"))
    first_config = (tmp_path / "config.yaml").read_text()
    capsys.readouterr()
    cfg = tiny_config(tmp_path, "trainer.max_steps=10", "optimizer.lr=6e-3", "optimizer.gamma1=0.8")
    results = train.train(cfg)
    out = capsys.readouterr().out
    assert results["step"] == 10
    assert ("resuming with changed settings: optimizer.gamma1 0.7 -> 0.8, optimizer.lr 0.003 -> 0.006, "
            "trainer.max_steps 6 -> 10") in out
    new_schedule = WarmupDecay.from_config(cfg.trainer)
    lrs = logged(tmp_path, "lr")
    for step in range(7, 11):
        assert lrs[step] == pytest.approx(6e-3 * new_schedule(step - 1), rel=1e-12)
    assert (tmp_path / "config.yaml").read_text() == first_config, "the first run's config is history"
    assert "lr: 0.006" in (tmp_path / "config.step_00000006.yaml").read_text()
    optimizer = torch.load(tmp_path / "checkpoints" / "step_00000010" / "optimizer.pt", weights_only=False)
    assert {g["gamma1"] for g in optimizer["param_groups"]} == {0.8}
    assert {g["total_steps"] for g in optimizer["param_groups"]} == {None}


@pytest.mark.parametrize(("override", "key"), [("model.hidden_size=64", "model.hidden_size"),
                                               ("data.seq_len=16", "data.seq_len"),
                                               ("optimizer=spam", "optimizer.kind")])
def test_changes_the_checkpoint_cannot_follow_are_refused(tmp_path, tiny_config, override, key):
    train.train(tiny_config(tmp_path, "trainer.max_steps=2"))
    with pytest.raises(ConfigError, match=f"^{key} cannot change on resume"):
        train.train(tiny_config(tmp_path, "trainer.max_steps=4", override))


def test_corrupt_newest_checkpoint_falls_back_to_the_older_one(tmp_path, tiny_config, capsys):
    train.train(tiny_config(tmp_path, "trainer.max_steps=4"))
    reference = tmp_path.parent / f"{tmp_path.name}-reference"
    train.train(tiny_config(reference, "trainer.max_steps=6"))
    weights = tmp_path / "checkpoints" / "step_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    train.train(tiny_config(tmp_path, "trainer.max_steps=6"))
    captured = capsys.readouterr()
    assert "step_00000004 is corrupt" in captured.err and "resumed from step_00000002 at step 2" in captured.out
    assert (tmp_path / "checkpoints" / "corrupt_step_00000004").is_dir()
    assert logged(tmp_path, "loss") == logged(reference, "loss"), "exact from the older checkpoint, no duplicate rows"


def test_resume_false_refuses_a_run_dir_with_checkpoints_unless_overwrite(tmp_path, tiny_config):
    train.train(tiny_config(tmp_path, "trainer.max_steps=2"))
    with pytest.raises(ConfigError, match="checkpoint.resume=false.*checkpoint.overwrite=true"):
        train.train(tiny_config(tmp_path, "trainer.max_steps=4", "checkpoint.resume=false"))
    results = train.train(tiny_config(tmp_path, "trainer.max_steps=4", "checkpoint.resume=false",
                                      "checkpoint.overwrite=true"))
    assert results["step"] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert sorted(logged(tmp_path, "loss")) == [1, 2, 3, 4]
    assert not list(tmp_path.glob("config.step_*.yaml"))


def test_rows_logged_after_the_last_checkpoint_are_not_duplicated(tmp_path, tiny_config):
    train.train(tiny_config(tmp_path, "trainer.max_steps=4"))
    with open(tmp_path / "metrics.jsonl", "a") as metrics:  # a crash after logging steps 5-6, before saving
        for step in (5, 6):
            metrics.write(json.dumps({"step": step, "loss": 99.0}) + "\n")
    train.train(tiny_config(tmp_path, "trainer.max_steps=7"))
    steps = [r["step"] for r in records(tmp_path) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    assert 99.0 not in logged(tmp_path, "loss").values()


def test_evaluation_frequency_does_not_change_a_stochastic_rounding_run(tmp_path, tiny_config):
    stochastic = ["quant=int4", "quant.activation.stochastic=true", "quant.gradient.format=int4",
                  "quant.gradient.stochastic=true", "checkpoint.every=0", "trainer.max_steps=4"]
    train.train(tiny_config(tmp_path / "often", *stochastic, "trainer.eval_every=1"))
    train.train(tiny_config(tmp_path / "rarely", *stochastic, "trainer.eval_every=100"))
    assert logged(tmp_path / "often", "loss") == logged(tmp_path / "rarely", "loss")
    assert len(logged(tmp_path / "often", "val_loss")) == 4


def test_quantization_error_is_logged_per_layer_without_changing_the_run(tmp_path, tiny_config):
    stochastic = ["quant=int4", "quant.activation.stochastic=true", "checkpoint.every=0"]
    train.train(tiny_config(tmp_path / "measured", *stochastic, "trainer.quant_error_every=2"))
    train.train(tiny_config(tmp_path / "plain", *stochastic, "trainer.quant_error_every=0"))
    assert logged(tmp_path / "measured", "loss") == logged(tmp_path / "plain", "loss")
    sqnr = [r for r in records(tmp_path / "measured") if "sqnr_weight_mean" in r]
    assert [r["step"] for r in sqnr] == [2, 4, 6]
    layers = [k for k in sqnr[0] if k.startswith("sqnr/") and k.endswith("/weight")]
    assert len(layers) == 14 and "sqnr/model.layers.0.self_attn.q_proj/activation" in sqnr[0]
    assert all(10 < r["sqnr_weight_mean"] < 30 for r in sqnr), "INT4 with g128 keeps about 4-5 bits of signal"
