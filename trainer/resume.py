"""What a resumed run may change: the composed config wins for every setting it can honour.

A checkpoint holds state (weights, moments, counters, data position, RNG) and the config it was
saved with. On resume the two configs are compared key by key; every difference is reported in
one line, and a difference that the saved state cannot follow (another model shape, tokenizer,
row layout or data stream, another optimizer, DDP <-> FSDP2: a DDP checkpoint is one safetensors
file, an FSDP2 one is sharded DCP) is refused with one line naming the key.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainer.config import ConfigError

# Keys (or key prefixes ending in ".") whose change the saved state cannot follow.
FIXED_ON_RESUME = (
    "model.",
    "optimizer.kind",
    "data.name",
    "data.hub_id",
    "data.hub_config",
    "data.tokenizer",
    "data.seq_len",
    "data.packing",
    "data.shuffle",
    "data.shuffle_buffer",
    "data.seed",
    "data.format",
    "data.lanes",
    "data.lane_rows",
    "trainer.seed",
    "trainer.parallelism",
)
# Keys that never matter for the saved state: where the run lives and how it is displayed.
IGNORED = ("run_dir", "output_root", "logging.progress", "checkpoint.resume", "checkpoint.overwrite")
# Keys added after checkpoints were written: a config without one has this value.
ADDED_KEYS = {"trainer.parallelism": "ddp"}
# Weights are kept in fp32 in both of these, so a run can move between them; pure_bf16 stores bf16.
_FP32_MASTER = ("fp32", "bf16_mixed")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def changed_settings(saved: DictConfig, current: DictConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every leaf that differs, in key order."""
    old = {**ADDED_KEYS, **_flatten(OmegaConf.to_container(saved, resolve=True))}
    new = {**ADDED_KEYS, **_flatten(OmegaConf.to_container(current, resolve=True))}
    changes = []
    for key in sorted(set(old) | set(new)):
        if key in IGNORED or key.startswith("hydra."):
            continue
        if old.get(key) != new.get(key):
            changes.append((key, old.get(key), new.get(key)))
    return changes


def refuse_unhonourable(changes: list[tuple[str, Any, Any]]) -> None:
    """Raise ConfigError naming the first change the checkpoint cannot follow."""
    for key, old, new in changes:
        fixed = any(key == k or (k.endswith(".") and key.startswith(k)) for k in FIXED_ON_RESUME)
        if key == "trainer.precision" and {old, new} <= set(_FP32_MASTER):
            fixed = False
        elif key == "trainer.precision":
            fixed = True
        if fixed:
            raise ConfigError(
                f"{key} cannot change on resume ({old} -> {new}): the checkpoint's state depends on it; "
                f"start a new run_dir, or set it back to {old}"
            )


def describe(changes: list[tuple[str, Any, Any]]) -> str:
    return "resuming with changed settings: " + ", ".join(f"{key} {old} -> {new}" for key, old, new in changes)
