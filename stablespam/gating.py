"""Device-gated optimizer steps: `gated_step(optimizer, skip)` applies or skips an update on a device
flag without reading it on the host (after OLMo-core's SkipStepOptimizer and torch AMP's `found_inf`).

What a skipped step (skip True) keeps: parameters, moments, running statistics (AdaClip / AdaGN /
GSNorm EMAs), per-tensor update counters (bias corrections) and quantized states, bit for bit. What
it advances: positions that count calls, not updates: StableSPAM's and SPAM's `group["global_step"]`
(the beta1/gamma1 cosine and the reset phase), `Stabilized`'s `stabilizer_step` (MoRet's phase,
SpikeClip's delay), like the loop's LR schedule, so a skipped step consumes its batch and its schedule
position. A momentum reset that falls on a skipped step is dropped: the moments are kept and the next
reset comes at the next multiple of the interval. With skip False the step is the ungated one, bit for
bit on CPU (on CUDA the gated scalars are computed by device pow/div, which may differ by an ulp).

How, per optimizer (`gating_mode`):
- "found_inf": torch Adam/AdamW run fused (`prepare` switches them); the fused kernels return
  early when the device float `found_inf` is 1 and take `state["step"]` back;
- "select": Lion, StableSPAM and `Stabilized` over a gateable base run their ordinary step and every
  tensor it wrote is then set to `torch.where(skip, before, after)`. Their per-tensor counters become
  0-dim fp64 device tensors at the first gated step (fp64 keeps the bias corrections equal to the host
  float arithmetic). The price: one copy of the stepped parameters and state per step, and one bucket
  per tensor in StableSPAM / the stabilizers (tensor counters cannot be grouped on the host);
- "host": SPAM (masks and step sizes from host counters), Adam-mini, HF Adafactor and the 8/4-bit
  LowBitAdam compute step sizes from host counters; for them the flag is read on the host, one sync
  per step, which `prepare` announces.
"""
from __future__ import annotations

from typing import Any

import torch

from stablespam.lion import Lion
from stablespam.stabilizers import Stabilized
from stablespam.stable_spam import StableSPAM

# optimizer class -> its per-tensor host counters that become device tensors under gating
_COUNTERS: dict[type, tuple[str, ...]] = {
    Lion: (),
    StableSPAM: ("step", "stat_step"),
    Stabilized: ("adaclip_step", "adagn_step"),
}


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind accelerate's `AcceleratedOptimizer`."""
    return getattr(optimizer, "optimizer", optimizer)


def _fused_capable(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)


def gating_mode(optimizer: Any) -> str:
    """'found_inf', 'select' or 'host' (see the module docstring)."""
    optimizer = _unwrap(optimizer)
    if _fused_capable(optimizer):
        return "found_inf"
    if isinstance(optimizer, Stabilized):
        return "select" if gating_mode(optimizer.base) != "host" else "host"
    return "select" if isinstance(optimizer, tuple(_COUNTERS)) else "host"


def _use_fused(optimizer: torch.optim.Optimizer) -> None:
    """Switch torch Adam/AdamW to the fused kernel (only its path honours `found_inf`), whose
    `step` counters live on the parameters' device."""
    for group in optimizer.param_groups:
        if group["fused"]:
            continue
        group["fused"], group["foreach"] = True, False
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                state["step"] = state["step"].to(p.device, torch.float32)


def prepare(optimizer: Any) -> str:
    """Make `optimizer` ready for `gated_step` (torch Adam/AdamW switch to their fused kernel) and
    return one line saying how its steps are gated."""
    inner = _unwrap(optimizer)
    for opt in (inner, getattr(inner, "base", None)):
        if opt is not None and _fused_capable(opt):
            _use_fused(opt)
    mode = gating_mode(inner)
    name = type(inner).__name__ + (f"({type(inner.base).__name__})" if isinstance(inner, Stabilized) else "")
    if mode == "host":
        return (f"update skipping: {name} needs host counters, so the skip decision is read on the host "
                f"(one sync per step)")
    how = "fused kernel's found_inf" if mode == "found_inf" else "device select"
    return f"update skipping: on the device ({name}: {how}; no per-step sync)"


def _materialize(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """Create the state a first step would create, so a skipped first step leaves it at its initial value."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None or optimizer.state[p]:
                continue
            if isinstance(optimizer, StableSPAM):
                optimizer._init_state(p, group["fp32_moments"], group["state_bits"])
            elif isinstance(optimizer, Lion):
                optimizer.state[p]["exp_avg"] = torch.zeros_like(p)
    if isinstance(optimizer, Stabilized):
        for p in params:
            optimizer.init_statistics(p)


def _counters_to_device(optimizer: torch.optim.Optimizer, keys: tuple[str, ...]) -> None:
    """Host counters (and a resumed "step", which torch's load_state_dict leaves on the CPU) become
    fp64 tensors on the parameter's device, filled in place (a pageable copy to a GPU would sync)."""
    for p, state in optimizer.state.items():
        for key in keys:
            value = state.get(key)
            if value is None or isinstance(value, torch.Tensor) and value.device == p.device:
                if value is not None and value.dtype != torch.float64:
                    state[key] = value.to(torch.float64)
                continue
            state[key] = torch.full((), float(value), dtype=torch.float64, device=p.device)  # a host value


def _reset_due(optimizer: Stabilized) -> bool:
    """Whether this call of `optimizer.step()` resets the base's state (host values only)."""
    interval = optimizer.moret.interval if optimizer.moret else 0
    return interval > 0 and any((g["stabilizer_step"] + 1) % interval == 0 for g in optimizer.param_groups)


def gated_step(optimizer: Any, skip: torch.Tensor) -> None:
    """`optimizer.step()` unless the device bool `skip` is True, without a host read (except in the
    'host' mode); `optimizer` may be accelerate's wrapper."""
    inner = _unwrap(optimizer)
    mode = gating_mode(inner)
    if mode == "host":
        if not bool(skip):
            optimizer.step()
        return
    params = [p for g in inner.param_groups for p in g["params"] if p.grad is not None]
    layers = [inner, inner.base] if isinstance(inner, Stabilized) else [inner]
    fused = [opt for opt in layers if _fused_capable(opt)]
    for opt in fused:
        _use_fused(opt)
    watched = [opt for opt in layers if opt not in fused]
    if isinstance(inner, Stabilized) and fused and _reset_due(inner):
        watched.append(inner.base)  # MoRet zeroes the fused base's state on the host: undo it if skipped
    for opt in watched:
        _materialize(opt, params)
        _counters_to_device(opt, next((keys for cls, keys in _COUNTERS.items() if isinstance(opt, cls)), ()))
    writes_params = any(not isinstance(opt, Stabilized) for opt in watched)  # the wrapper writes only grads
    before = [(p, p.detach().clone()) for p in params] if writes_params else []
    states = [(opt.state[p], {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)})
              for opt in watched for p in params]
    flag = skip.to(torch.float32)
    for opt in fused:
        opt.found_inf = flag
    try:
        optimizer.step()
    finally:
        for opt in fused:
            del opt.found_inf
    for p, old in before:
        p.detach().copy_(torch.where(skip, old, p.detach()))
    for state, saved in states:
        for key, old in saved.items():
            new = torch.where(skip, old, state[key])
            if old.dim() == 0:  # counters may be aliased (StableSPAM's official mode): never write in place
                state[key] = new
            else:
                state[key].copy_(new)
