"""Checkpoints are verified, atomic and rotate: a killed save or a corrupt file never costs a good one."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from trainer.checkpoint import MANIFEST, CheckpointError, CheckpointManager, check_model_shapes, verify

CONFIG = OmegaConf.create({"trainer": {"max_steps": 4}})


def plain_load(optimizer, state_dict):
    optimizer.load_state_dict(state_dict)


@pytest.fixture
def prepared(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    warnings: list[str] = []
    manager = CheckpointManager(accelerator, tmp_path / "ckpt", keep_last=2, warn=warnings.append)
    return model, optimizer, manager, warnings


def train_one_step(model, optimizer):
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def save(manager, model, optimizer, step, **state):
    return manager.save(step, model, optimizer, {"step": step, **state}, CONFIG)


def test_round_trip_restores_model_optimizer_rank_state_and_rng(prepared):
    model, optimizer, manager, _ = prepared
    train_one_step(model, optimizer)
    path = save(manager, model, optimizer, 1, data={"cursor": 7})
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))
    weights = model.weight.detach().clone()
    train_one_step(model, optimizer)
    assert not torch.equal(weights, model.weight)
    state = manager.load(path, model, optimizer.optimizer, plain_load)
    assert state == {"step": 1, "data": {"cursor": 7}, "saved_world_size": 1}
    assert torch.equal(weights, model.weight)
    assert optimizer.state_dict()["state"][0]["step"].item() == 1
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_draws
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["world_size"] == 1 and set(manifest["files"]) == {
        "model.safetensors", "optimizer.pt", "rank_0.pt", "config.yaml"}


def test_killed_save_leaves_previous_checkpoint_as_latest(prepared, monkeypatch):
    model, optimizer, manager, _ = prepared
    good = save(manager, model, optimizer, 1)

    def die_half_way(*args, **kwargs):
        (manager.directory / ".incomplete_step_00000002" / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr("trainer.checkpoint.save_model", die_half_way)
    with pytest.raises(KeyboardInterrupt):
        save(manager, model, optimizer, 2)
    assert manager.latest_intact() == good
    assert [step for step, _ in manager.complete_checkpoints()] == [1]


def test_keeps_only_the_last_k(prepared):
    model, optimizer, manager, _ = prepared
    for step in range(1, 5):
        train_one_step(model, optimizer)
        save(manager, model, optimizer, step)
    assert [step for step, _ in manager.complete_checkpoints()] == [3, 4]


@pytest.mark.parametrize("damage", ["truncate-model", "truncate-rng", "flip-optimizer", "delete-rng", "no-manifest"])
def test_corrupt_newest_checkpoint_is_set_aside_and_the_older_one_used(prepared, damage):
    model, optimizer, manager, warnings = prepared
    older = save(manager, model, optimizer, 1)
    train_one_step(model, optimizer)
    newest = save(manager, model, optimizer, 2)
    if damage == "truncate-model":
        file = newest / "model.safetensors"
        file.write_bytes(file.read_bytes()[:-10])
    elif damage == "truncate-rng":
        file = newest / "rank_0.pt"
        file.write_bytes(file.read_bytes()[:50])
    elif damage == "flip-optimizer":
        file = newest / "optimizer.pt"
        raw = bytearray(file.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        file.write_bytes(bytes(raw))
    elif damage == "delete-rng":
        (newest / "rank_0.pt").unlink()
    else:
        (newest / MANIFEST).unlink()
    assert verify(newest) is not None and verify(older) is None
    assert manager.latest_intact() == older
    assert (manager.directory / "corrupt_step_00000002").is_dir(), "set aside, never deleted"
    assert len(warnings) == 1 and "step_00000002" in warnings[0]


def test_all_checkpoints_corrupt_is_an_error_not_a_fresh_start(prepared):
    model, optimizer, manager, _ = prepared
    path = save(manager, model, optimizer, 1)
    (path / "optimizer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*checkpoint.overwrite=true"):
        manager.latest_intact()


def test_another_model_size_is_named_in_one_line(prepared, tmp_path):
    model, optimizer, manager, _ = prepared
    path = save(manager, model, optimizer, 1)
    with pytest.raises(CheckpointError, match=r"weight of shape \[2, 3\] but this model's is \[2, 5\]"):
        check_model_shapes(path, torch.nn.Linear(5, 2))
