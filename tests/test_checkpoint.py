"""Checkpoints are atomic and rotate: a save that dies half-way never costs the previous one."""
from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from trainer.checkpoint import CheckpointManager


@pytest.fixture
def prepared(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, CheckpointManager(accelerator, tmp_path / "ckpt", keep_last=2)


def train_one_step(model, optimizer):
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_round_trip_restores_model_optimizer_and_rank_state(prepared):
    accelerator, model, optimizer, manager = prepared
    train_one_step(model, optimizer)
    path = manager.save(1, {"step": 1, "data": {"cursor": 7}})
    weights = model.weight.detach().clone()
    train_one_step(model, optimizer)
    assert not torch.equal(weights, model.weight)
    state = manager.load(path)
    assert state == {"step": 1, "data": {"cursor": 7}}
    assert torch.equal(weights, model.weight)
    assert optimizer.state_dict()["state"][0]["step"].item() == 1


def test_killed_save_leaves_previous_checkpoint_as_latest(prepared, monkeypatch):
    accelerator, model, optimizer, manager = prepared
    good = manager.save(1, {"step": 1})

    def die_half_way(output_dir):
        (manager.directory / ".incomplete_step_00000002" / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(accelerator, "save_state", die_half_way)
    with pytest.raises(KeyboardInterrupt):
        manager.save(2, {"step": 2})
    assert manager.latest() == good
    assert [step for step, _ in manager.complete_checkpoints()] == [1]


def test_keeps_only_the_last_k(prepared):
    _, model, optimizer, manager = prepared
    for step in range(1, 5):
        train_one_step(model, optimizer)
        manager.save(step, {"step": step})
    assert [step for step, _ in manager.complete_checkpoints()] == [3, 4]
