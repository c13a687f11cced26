"""Process-level plumbing: the run directory all ranks agree on, and preemption signals."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

PREEMPTED_EXIT_CODE = 75
"""EX_TEMPFAIL: the run saved a checkpoint on SIGTERM/SIGUSR1 and wants to be started again."""
PREEMPTED_MARKER = "PREEMPTED"
"""Written into the run directory on pre-emption (launchers hide exit codes); removed on resume."""


def default_run_id() -> str | None:
    """The SLURM job id (array jobs: <array job>_<task>), shared by every rank and kept on requeue."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def resolve_run_dir(accelerator: Accelerator, run_dir: str | None, output_root: str) -> Path:
    """An explicit `run_dir`, else <output_root>/<SLURM job id>, else a timestamp chosen on rank 0."""
    if run_dir is None:
        run_id = default_run_id() or time.strftime("%Y%m%d-%H%M%S")
        chosen = [str(Path(output_root) / run_id)]
        broadcast_object_list(chosen, from_process=0)
        run_dir = chosen[0]
    path = Path(run_dir).absolute()
    if accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return path


class PreemptionFlag:
    """Set by SIGTERM or SIGUSR1 (SLURM's pre-emption warnings).

    One process reads its own flag every step (a Python bool, no device work). Several processes
    must agree on the step they stop at, which takes a collective and a host read: they poll only
    on steps that sync anyway (logging steps), so a pre-empted multi-process run reacts within
    `trainer.log_every` steps.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    def should_stop(self, syncing_step: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return self.received is not None
        if not syncing_step:
            return False
        local = torch.tensor([1.0 if self.received is not None else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(local, reduction="sum").item() > 0)


def finish(accelerator: Accelerator) -> None:
    """Close trackers and the process group without the gloo teardown deadlock.

    After the last barrier, gloo's worker thread still has to drop the barrier's tensors, which needs
    the GIL; if the main thread meanwhile frees the process group (its destructor joins that thread
    while holding the GIL) the rank hangs forever. Sleeping releases the GIL so the worker can finish.
    """
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        time.sleep(0.2)
    accelerator.end_training()
