"""Atomic, rotating checkpoints on top of `accelerate`'s save_state/load_state.

accelerate writes model, optimizer, LR scheduler and every rank's RNG states; it saves registered
custom objects from the main process only, so the per-rank state (data position, stochastic-rounding
generators, counters) goes into `rank_state_<rank>.pt` written by each rank here. A checkpoint is
written to a hidden temporary directory and renamed into place once every rank has finished, so a
save killed half-way never replaces or corrupts the previous checkpoint.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointManager:
    def __init__(self, accelerator: Accelerator, directory: Path, keep_last: int):
        self.accelerator = accelerator
        self.directory = directory
        self.keep_last = keep_last

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def latest(self) -> Path | None:
        checkpoints = self.complete_checkpoints()
        return checkpoints[-1][1] if checkpoints else None

    def save(self, step: int, rank_state: dict[str, Any]) -> Path:
        acc = self.accelerator
        final = self.directory / f"step_{step:08d}"
        if final.is_dir():
            return final  # this exact step is already saved (a preemption right after a periodic save)
        staging = self.directory / f".incomplete_step_{step:08d}"
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(staging))
        torch.save(rank_state, staging / f"rank_state_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            staging.rename(final)
            for _, old in self.complete_checkpoints()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> dict[str, Any]:
        """Restore model/optimizer/scheduler/RNG in place; returns this rank's rank_state."""
        rank_file = path / f"rank_state_{self.accelerator.process_index}.pt"
        if not rank_file.exists():
            raise FileNotFoundError(
                f"checkpoint {path} has no {rank_file.name}: it was saved with a different number of "
                f"processes; resume with the same world size"
            )
        self.accelerator.load_state(str(path))
        return torch.load(rank_file, map_location="cpu", weights_only=False)
