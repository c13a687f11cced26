"""Resume that follows the config: load an optimizer's state and counters, keep the hyperparameters
it was built with.

`torch.optim.Optimizer.load_state_dict` replaces the param groups with the saved ones, so a run
resumed with a new `optimizer.lr`, betas, gammas or reset interval would silently train with the old
values, and a CPU checkpoint resumed on CUDA would keep `foreach` instead of `fused`.
`load_state_keeping_hyperparameters` takes the per-parameter state (moments, statistics, masks,
per-tensor counters) and the group entries named in `GROUP_STATE_KEYS` from the checkpoint, and every
other group entry from the optimizer as built. A change the saved state cannot follow raises
`OptimizerConfigError` naming the key.

Adam's moments follow `optimizer.state_bits` (StableSPAM, SPAM, adam/adamw): a checkpoint written
with other state bits is converted (codes dequantized, float moments quantized), rather than refused,
so a run can move to 8-bit states when memory runs short (adam/adamw move between torch's class and
LowBitAdam, which share the state layout).
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.optimization import Adafactor as HFAdafactor

from stablespam._state import OptimizerConfigError, restore_saved_dtypes
from stablespam.low_bit_adam import LowBitAdam
from stablespam.quantized_state import convert_moments
from stablespam.spam import SPAM
from stablespam.stabilizers import Stabilized
from stablespam.stable_spam import StableSPAM, stat_dtype

# optimizers whose Adam moments follow `state_bits` (torch's classes: always 32)
_ADAM_MOMENTS = (StableSPAM, SPAM, LowBitAdam, torch.optim.Adam, torch.optim.AdamW)

# Param-group entries that are training state (step counters), not hyperparameters: StableSPAM's and
# SPAM's global step, the step of the Stabilized wrapper (MoRet's phase). Everything else in a group
# (lr, base_lr, betas, eps, gammas, intervals, foreach/fused, ...) is a hyperparameter.
GROUP_STATE_KEYS = ("global_step", "stabilizer_step")


def _chain(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """`optimizer` and the optimizers it wraps (accelerate's AcceleratedOptimizer, Stabilized)."""
    chain = [optimizer]
    while True:
        inner = getattr(chain[-1], "base", None) or getattr(chain[-1], "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            return chain
        chain.append(inner)


def _refuse_unfollowable_changes(chain: list[torch.optim.Optimizer], saved_groups: list[dict[str, Any]]) -> None:
    groups = chain[0].param_groups
    sizes = [len(g["params"]) for g in groups]
    saved_sizes = [len(g["params"]) for g in saved_groups]
    if sizes != saved_sizes:
        raise OptimizerConfigError(
            f"the checkpoint's optimizer has param groups of {saved_sizes} tensors, the one built from "
            f"the config {sizes}: the model or optimizer.kind differs from the checkpoint's"
        )
    moret = next((o.moret for o in chain if isinstance(o, Stabilized) and o.moret), None)
    for saved, group in zip(saved_groups, groups):
        if ("global_step" in saved) != ("global_step" in group):
            raise OptimizerConfigError(
                "optimizer.kind differs from the checkpoint's (one of them keeps a global_step in its "
                "param groups, the other does not)"
            )
        if "density" in group and saved.get("density") != group["density"]:
            raise OptimizerConfigError(
                f"optimizer.density={group['density']} cannot change on resume (the checkpoint has "
                f"{saved.get('density')}): SPAM's masks and sparse moments are shaped by it"
            )
        if saved.get("mode") == "official" and group.get("mode") == "corrected":
            raise OptimizerConfigError(
                "optimizer.mode=corrected cannot resume an official-mode checkpoint: official mode "
                "does not keep the never-reset counter that corrected mode's bias corrections need"
            )
        if moret and "stabilizer_step" not in saved:
            raise OptimizerConfigError(
                f"optimizer.moret_interval={moret.interval} cannot start on resume: the checkpoint was "
                "written without the Stabilized wrapper, so the momentum-reset phase is unknown"
            )


def _conform_state(optimizer: torch.optim.Optimizer) -> None:
    """Per-parameter state whose layout a hyperparameter decides follows the (current) groups."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            if isinstance(optimizer, _ADAM_MOMENTS):
                dtype = torch.float32 if group.get("fp32_moments") else p.dtype
                shape = state["mask"].shape if "mask" in state else p.shape
                convert_moments(state, group.get("state_bits", 32), shape, dtype)
            elif isinstance(optimizer, HFAdafactor) and group["beta1"] is not None and "exp_avg" not in state:
                # beta1 switched on: the first moment starts at zero, as Adafactor's own first step does
                state["exp_avg"] = torch.zeros_like(p, dtype=stat_dtype(p.dtype))


def load_state_keeping_hyperparameters(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Use instead of `optimizer.load_state_dict(state_dict)` when resuming from a checkpoint.

    Loads the per-parameter state and the `GROUP_STATE_KEYS` counters of `state_dict` and keeps
    every other param-group entry as `optimizer` holds it now, so call it on the optimizer freshly
    built from the current config (not after a plain `load_state_dict`, which has already replaced
    the groups). Works through `Stabilized` and accelerate's `AcceleratedOptimizer`.
    Raises `OptimizerConfigError` for a change the saved state cannot follow.
    """
    chain = _chain(optimizer)
    state_dict = dict(state_dict)
    saved_groups = state_dict["param_groups"]
    _refuse_unfollowable_changes(chain, saved_groups)
    if any(isinstance(o, Stabilized) for o in chain):
        state_dict.setdefault("stabilizer_state", {})  # stabilizers switched on now: statistics start afresh
    merged = []
    for saved, group in zip(saved_groups, optimizer.param_groups):
        entry = {key: value for key, value in group.items() if key != "params"}
        entry.update({key: saved[key] for key in GROUP_STATE_KEYS if key in saved and key in group})
        entry["params"] = saved["params"]
        merged.append(entry)
    state_dict["param_groups"] = merged
    optimizer.load_state_dict(state_dict)
    for inner in chain:
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):  # cast quantized codes and scales to floats
            restore_saved_dtypes(inner, state_dict)
        _conform_state(inner)
