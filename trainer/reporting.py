"""Where metrics go on rank 0: a JSONL file in the run directory, the console and wandb.

The console shows a rich progress bar with ETA on a terminal and plain lines otherwise (SLURM logs,
CI); wandb is driven through accelerate's tracker so it follows the same `log` calls.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_CONSOLE_KEYS = ("loss", "ppl", "lr", "grad_norm", "tokens_per_s", "mfu")


def resolve_wandb_mode(configured: str | None) -> str:
    mode = configured or os.environ.get("WANDB_MODE") or "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logging.wandb_mode / WANDB_MODE={mode!r}: choose online, offline or disabled")
    return mode


def _format(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key == "lr":
            return f"{key} {value:.2e}"
        if key == "mfu":
            return f"{key} {value:.1%}"
        if key == "tokens_per_s":
            return f"tok/s {value:,.0f}"
        return f"{key} {value:.4g}"
    return f"{key} {value}"


class Reporter:
    def __init__(self, accelerator: Accelerator, run_dir: Path, max_steps: int, progress: str):
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.max_steps = max_steps
        self.console = Console(highlight=False, soft_wrap=True)
        self.metrics_file = open(run_dir / "metrics.jsonl", "a") if self.enabled else None
        use_bar = progress == "bar" or (progress == "auto" and sys.stdout.isatty())
        self.progress: Progress | None = None
        if self.enabled and use_bar:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[summary]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            )
            self.task = self.progress.add_task("train", total=max_steps, summary="")

    def start(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)
            self.progress.start()

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, markup=False)

    def log(self, step: int, metrics: dict[str, Any], *, console: bool) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.metrics_file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self.metrics_file.flush()
        self.accelerator.log({k: v for k, v in metrics.items() if v is not None}, step=step)
        summary = " | ".join(_format(k, metrics[k]) for k in _CONSOLE_KEYS if metrics.get(k) is not None)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, summary=summary)
        elif console:
            self.console.print(f"step {step}/{self.max_steps} | {summary}", markup=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.metrics_file is not None:
            self.metrics_file.close()
