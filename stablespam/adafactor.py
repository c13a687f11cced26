"""Adafactor with the Hugging Face semantics the papers used (transformers' implementation).

We subclass `transformers.optimization.Adafactor` (the library does the job; torch.optim.Adafactor
cannot turn off relative steps or parameter scaling and has no beta1) only to refuse a negative
learning rate (the library accepts it and climbs the loss) and to keep its fp32 state fp32 across
`load_state_dict` for bf16 parameters (the base class would down-cast it).
"""
from __future__ import annotations

from typing import Any

from transformers.optimization import Adafactor as HFAdafactor

from stablespam._state import restore_saved_dtypes


class Adafactor(HFAdafactor):
    """`transformers.optimization.Adafactor` refusing lr < 0, with a state_dict round trip that keeps fp32 state."""

    def __init__(self, params: Any, lr: float | None = None, *args: Any, **kwargs: Any) -> None:
        if lr is not None and lr < 0:
            raise ValueError(f"lr must be >= 0 (or None with relative_step), got {lr}")
        super().__init__(params, lr, *args, **kwargs)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restore_saved_dtypes(self, state_dict)
