"""Where metrics go on rank 0: a JSONL file in the run directory, the console and wandb.

The console shows a rich progress bar on a terminal and plain lines otherwise (SLURM logs, CI);
the bar keeps the step count, the ETA and the last training and validation metrics, and its
metrics column is the one that gets cut on a narrow terminal. wandb is driven through accelerate's
tracker so it follows the same `log` calls. On resume, `metrics.jsonl` is cut back to the resumed
step so replayed steps are not logged twice.
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
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column

_CONSOLE_KEYS = ("loss", "val_ppl", "lr", "grad_norm", "tokens_per_s", "mfu")
METRICS_FILE = "metrics.jsonl"


def resolve_wandb_mode(configured: str | None) -> str:
    from trainer.config import ConfigError

    mode = configured or os.environ.get("WANDB_MODE") or "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"logging.wandb_mode / WANDB_MODE={mode!r}: choose online, offline or disabled")
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


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the records of steps <= `last_step` (all of them go when starting from scratch)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    staging = path.with_suffix(".tmp")
    staging.write_text("".join(line + "\n" for line in kept))
    staging.replace(path)


def progress_bar(console: Console, max_steps: int) -> tuple[Progress, Any]:
    """Step count and ETA first, fixed width; the metrics summary last, cut with an ellipsis."""
    progress = Progress(
        TextColumn("[bold]step[/] {task.completed}/{task.total}", table_column=Column(no_wrap=True)),
        BarColumn(bar_width=12),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[summary]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        console=console, expand=True,
    )
    return progress, progress.add_task("train", total=max_steps, summary="")


class Reporter:
    def __init__(self, accelerator: Accelerator, run_dir: Path, max_steps: int, progress: str, resumed_step: int):
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.max_steps = max_steps
        self.console = Console(highlight=False, soft_wrap=True)
        self.errors = Console(highlight=False, soft_wrap=True, stderr=True)
        self.metrics_file = None
        self.last: dict[str, Any] = {}
        if self.enabled:
            truncate_metrics(run_dir / METRICS_FILE, resumed_step)
            self.metrics_file = open(run_dir / METRICS_FILE, "a")
        use_bar = progress == "bar" or (progress == "auto" and sys.stdout.isatty())
        self.progress: Progress | None = None
        if self.enabled and use_bar:
            self.progress, self.task = progress_bar(self.console, max_steps)

    def start(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)
            self.progress.start()

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, markup=False)

    def warn(self, message: str) -> None:
        if self.enabled:
            self.errors.print(message, markup=False)

    def log(self, step: int, metrics: dict[str, Any], *, console: bool) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.metrics_file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self.metrics_file.flush()
        self.accelerator.log({k: v for k, v in metrics.items() if v is not None}, step=step)
        self.last.update({k: v for k, v in metrics.items() if k in _CONSOLE_KEYS and v is not None})
        if self.progress is not None:  # the bar keeps the latest of each, validation included
            summary = " | ".join(_format(k, self.last[k]) for k in _CONSOLE_KEYS if k in self.last)
            self.progress.update(self.task, completed=step, summary=summary)
        elif console:  # a plain line shows this record only; evaluations print their own lines
            summary = " | ".join(_format(k, metrics[k]) for k in _CONSOLE_KEYS if metrics.get(k) is not None)
            self.console.print(f"step {step}/{self.max_steps} | {summary}", markup=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.metrics_file is not None:
            self.metrics_file.close()
