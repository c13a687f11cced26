"""Verified, atomic, rotating checkpoints.

Layout of `checkpoints/step_<N>/`: `model.safetensors` and `optimizer.pt` (main process),
`rank_<r>.pt` (each rank: RNG streams, data position, quantizer streams, loop counters),
`config.yaml` (the composed config the run had when it saved) and `manifest.json` (written last:
step, world size, every file's size and sha256). Under `trainer.parallelism=fsdp2` model and
optimizer state are instead `sharded/` (torch.distributed.checkpoint: every rank writes its shards,
in parallel; a resume on another number of processes reshards them), under the same manifest.

Why not accelerate's `save_state`/`load_state`: its loader swallows an unreadable RNG file (resume
then silently stops being exact) and its optimizer load restores the saved hyperparameters over the
config's; we need a checkpoint that is verified before it is trusted and an optimizer load that
keeps the config's settings (`stablespam.load_state_keeping_hyperparameters`).

A save is staged in a hidden directory, every file and the directory are fsync'ed, then it is
renamed into place, so a killed save never costs the previous checkpoint. On resume the newest
checkpoint whose manifest matches its files is used; a corrupt one is renamed to
`corrupt_step_<N>` (never deleted) with a warning and the next older one is tried.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, OmegaConf
from data.prepare import fsync_directory as fsync_path
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from trainer.parallel import is_fsdp

_STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "config.yaml"
SHARDED_DIR = "sharded"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message names the file and what to do."""


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from on this rank."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def verify(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted, or None when every file matches its manifest."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is missing or unreadable"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


def saved_config(path: Path) -> DictConfig:
    return OmegaConf.load(path / CONFIG_FILE)  # type: ignore[return-value]


def check_model_shapes(path: Path, model: torch.nn.Module) -> None:
    """One line naming both shapes when the checkpoint holds a different model."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    with safe_open(str(path / MODEL_FILE), framework="pt") as saved:
        found = {name: tuple(saved.get_slice(name).get_shape()) for name in saved.keys()}
    for name, shape in found.items():
        if name in expected and expected[name] != shape:
            raise CheckpointError(
                f"checkpoint {path} holds {name} of shape {list(shape)} but this model's is "
                f"{list(expected[name])}: it belongs to another model size"
            )
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {missing[0]} (and {len(missing) - 1} more): another model")


class CheckpointManager:
    def __init__(self, accelerator: Accelerator, directory: Path, keep_last: int, warn: Callable[[str], None]):
        self.accelerator = accelerator
        self.directory = directory
        self.keep_last = keep_last
        self.warn = warn

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def set_aside(self) -> list[Path]:
        return sorted(p for p in self.directory.glob("corrupt_step_*")) if self.directory.is_dir() else []

    def latest(self) -> Path | None:
        checkpoints = self.complete_checkpoints()
        return checkpoints[-1][1] if checkpoints else None

    def latest_intact(self) -> Path | None:
        """The newest verified checkpoint; corrupt newer ones are set aside. Same answer on every rank."""
        chosen: list[str | None] = [None]
        if self.accelerator.is_main_process:
            for _, path in reversed(self.complete_checkpoints()):
                problem = verify(path)
                if problem is None:
                    chosen[0] = str(path)
                    break
                aside = path.with_name(f"corrupt_{path.name}")
                path.rename(aside)
                self.warn(f"warning: checkpoint {path} is corrupt ({problem}); set aside as {aside.name}")
            if chosen[0] is None and self.set_aside():
                raise CheckpointError(
                    f"no intact checkpoint in {self.directory}: every one was corrupt and is set aside "
                    f"({', '.join(p.name for p in self.set_aside())}); remove them or set checkpoint.overwrite=true "
                    f"to start this run again"
                )
        if self.accelerator.num_processes > 1:
            broadcast_object_list(chosen, from_process=0)
        return Path(chosen[0]) if chosen[0] else None

    def clear(self) -> None:
        if self.accelerator.is_main_process:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             rank_state: dict[str, Any], config: DictConfig) -> Path:
        acc = self.accelerator
        final = self.directory / f"step_{step:08d}"
        if final.is_dir():
            return final  # this exact step is already saved (a preemption right after a periodic save)
        staging = self.directory / f".incomplete_step_{step:08d}"
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        if is_fsdp(model):
            dcp.save({"model": model.state_dict(), "optimizer": _string_keys(optimizer.state_dict())[0]},
                     checkpoint_id=staging / SHARDED_DIR)
        elif acc.is_main_process:
            save_model(acc.unwrap_model(model), str(staging / MODEL_FILE))
            torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
        if acc.is_main_process:
            OmegaConf.save(config, staging / CONFIG_FILE, resolve=True)
        torch.save({**rank_state, "rng": rng_state()}, staging / rank_file(acc.process_index))
        acc.wait_for_everyone()
        if acc.is_main_process:
            files = {}
            for file in sorted(f for f in staging.rglob("*") if f.is_file()):
                fsync_path(file)
                files[str(file.relative_to(staging))] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
            if (staging / SHARDED_DIR).is_dir():
                fsync_path(staging / SHARDED_DIR)
            manifest = {"step": step, "world_size": acc.num_processes, "files": files}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
            fsync_path(staging / MANIFEST)
            fsync_path(staging)
            staging.rename(final)
            fsync_path(self.directory)
            for _, old in self.complete_checkpoints()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             load_optimizer: Callable[[torch.optim.Optimizer, dict[str, Any]], None]) -> dict[str, Any]:
        """Restore model, optimizer (through `load_optimizer`) and this rank's RNG; returns its rank state
        with `saved_world_size` added.

        Elastic resume (another number of processes): model and optimizer state are replicated under
        DDP (and resharded by DCP under FSDP2) and the loop, totals and data position are global, so
        every rank takes them from `rank_0.pt`; the per-rank random streams cannot be mapped to
        other ranks and are left for the caller to restart (see `elastic_seed`).
        """
        acc = self.accelerator
        saved_world = read_manifest(path)["world_size"]
        elastic = saved_world != acc.num_processes
        unwrapped = acc.unwrap_model(model)
        device = "cpu" if acc.device.type == "cpu" else str(acc.device)  # multi-process CPU runs report "cpu:0"
        if is_fsdp(model):
            load_optimizer(optimizer, load_sharded(path / SHARDED_DIR, model, optimizer))
        else:
            check_model_shapes(path, unwrapped)
            load_model(unwrapped, str(path / MODEL_FILE), device=device)
            load_optimizer(optimizer, torch.load(path / OPTIMIZER_FILE, map_location=device, weights_only=False))
        state = torch.load(path / rank_file(0 if elastic else acc.process_index), map_location="cpu", weights_only=False)
        rng = state.pop("rng")
        if not elastic:
            set_rng_state(rng)
        state["saved_world_size"] = saved_world
        return state


def load_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load the DCP checkpoint's weights into `model` in place; returns its optimizer state dict.

    DCP loads into a state dict of the right structure, so the optimizer's state is first created
    by one step on zero gradients at learning rate 0 (torch's own way, `_init_optim_state`: it moves
    no weight), then overwritten by the saved one.
    """
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    _init_optim_state(optimizer)
    template, per_param = _string_keys(optimizer.state_dict())
    state = {"model": model.state_dict(), "optimizer": template}
    dcp.load(state, checkpoint_id=directory)
    model.load_state_dict(state["model"])
    return {key: {int(i): v for i, v in value.items()} if key in per_param else value
            for key, value in state["optimizer"].items()}


def _string_keys(optimizer_state: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """The optimizer state dict with its per-parameter dicts keyed by str(index), and their names.

    DCP addresses entries by string paths: an int key would be loaded back under a second, string
    key (losing every non-tensor entry, such as the step counters).
    """
    per_param = {key for key, value in optimizer_state.items()
                 if isinstance(value, dict) and all(isinstance(i, int) for i in value)}
    return {key: {str(i): v for i, v in value.items()} if key in per_param else value
            for key, value in optimizer_state.items()}, per_param


def elastic_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a rank's random streams after an elastic resume at `step`: distinct per rank and
    per resume step, so no stream replays the noise it drew from step 0."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint32)[0])
