"""End-to-end runs of train.py on the bundled sample corpus: resume, multi-process, bad inputs."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A few-second run: tiny model, 32-token rows, 2 sequences per micro-batch, 2 accumulation steps.
TINY_RUN = [
    "+experiment=quickstart", "trainer.cpu=true", "logging.wandb_mode=disabled", "logging.progress=lines",
    "data.seq_len=32", "data.val_tokens=2048", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
    "trainer.warmup_steps=2", "trainer.eval_at_start=false", "trainer.log_every=1", "checkpoint.export_hf=false",
    "optimizer.reset_interval=3",
]


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *TINY_RUN, f"run_dir={run_dir}", *overrides]


def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("SLURM_JOB_ID", None)
    return env


def run(cmd: list[str], timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    """Run in a new session so that a timeout kills the launcher's workers too, leaving no orphan."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**environment(), **extra_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step; a step logged twice (before a kill and after resume) keeps the last."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def test_preempted_and_killed_runs_resume_to_the_uninterrupted_trajectory(tmp_path):
    steps = "trainer.max_steps=24"
    reference = run(command(tmp_path / "reference", steps, "checkpoint.every=6"))
    assert reference.returncode == 0, reference.stderr
    expected = train_losses(tmp_path / "reference")
    assert sorted(expected) == list(range(1, 25))

    # SIGTERM as soon as training is set up: the run saves at the end of step 1 and exits with 75.
    # Offline wandb here, to check that the resumed run continues the same wandb run.
    preempted_dir = tmp_path / "preempted"
    with_wandb = (steps, "checkpoint.every=6", "logging.wandb_mode=offline")
    proc = subprocess.Popen(command(preempted_dir, *with_wandb), cwd=ROOT, env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("run "):
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait(timeout=300) == 75
    assert (preempted_dir / "PREEMPTED").exists()
    assert (preempted_dir / "checkpoints" / "step_00000001").is_dir()
    resumed = run(command(preempted_dir, *with_wandb))
    assert resumed.returncode == 0, resumed.stderr
    lines = resumed.stdout.splitlines()
    start_up = lines[: next(i for i, line in enumerate(lines) if line.startswith("step "))]
    assert len(start_up) <= 8 and "trainer:" not in resumed.stdout, "a short summary, the full config is in the run dir"
    assert "wandb" not in resumed.stdout + resumed.stderr, "wandb's console output is off"
    assert "resumed from" in resumed.stdout and not (preempted_dir / "PREEMPTED").exists()
    assert train_losses(preempted_dir) == expected
    wandb_runs = sorted((preempted_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({run.name.rsplit("-", 1)[1] for run in wandb_runs}) == 1

    # SIGKILL after the step-6 checkpoint landed: no chance to save, resume from the checkpoint.
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(command(killed_dir, steps, "checkpoint.every=6"), cwd=ROOT, env=environment(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed_dir / "checkpoints" / "step_00000006").is_dir() and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert max(train_losses(killed_dir)) < 24, "the run finished before it could be killed"
    resumed = run(command(killed_dir, steps, "checkpoint.every=6"))
    assert resumed.returncode == 0, resumed.stderr
    assert train_losses(killed_dir) == expected
    kept = sorted(p.name for p in (killed_dir / "checkpoints").iterdir())
    assert kept == ["step_00000018", "step_00000024"]


def assert_two_processes_match_one(tmp_path: Path, overrides: list[str], two_only: tuple[str, ...] = (),
                                   timeout: int = 240) -> str:
    """Train 4 steps in 1 and in 2 processes (`two_only`: overrides of the 2-process run alone) and
    check that every step's loss agrees; returns the 1-process run's stdout."""
    single = run(command(tmp_path / "single", *overrides))
    assert single.returncode == 0, single.stderr
    double = launch_two(tmp_path / "double", *overrides, *two_only, timeout=timeout)
    assert double.returncode == 0, double.stderr
    assert "2 process(es)" in double.stdout
    one, two = train_losses(tmp_path / "single"), train_losses(tmp_path / "double")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)
    return single.stdout


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    assert_two_processes_match_one(tmp_path, ["trainer.max_steps=4", "checkpoint.every=0", "quant=int4"],
                                   two_only=("trainer.global_batch_size=4",))


def launch_two(run_dir: Path, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """2 processes on CPU: accelerate's `--multi_gpu` starts torchrun workers, which use gloo."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    return run(launcher + command(run_dir, *overrides)[1:], timeout=timeout, GLOO_SOCKET_IFNAME="lo")


def test_elastic_resume_between_one_and_two_processes(tmp_path):
    """A checkpoint saved by N processes resumes on M: 2 -> 1 and 1 -> 2 follow the uninterrupted run."""
    # a constant LR, so the first halves (max_steps=5) follow the same schedule as the whole run
    overrides = ["trainer.max_steps=10", "checkpoint.every=5", "quant=int4", "trainer.lr_schedule=constant"]
    reference = launch_two(tmp_path / "reference", *overrides)
    assert reference.returncode == 0, reference.stderr
    expected = train_losses(tmp_path / "reference")

    first_half = [*overrides[1:], "trainer.max_steps=5"]
    two_then_one = tmp_path / "two_then_one"
    assert launch_two(two_then_one, *first_half).returncode == 0
    resumed = run(command(two_then_one, *overrides))
    assert resumed.returncode == 0, resumed.stderr
    assert "elastic resume: 2 -> 1 process(es)" in resumed.stdout

    one_then_two = tmp_path / "one_then_two"
    assert run(command(one_then_two, *first_half)).returncode == 0
    resumed = launch_two(one_then_two, *overrides)
    assert resumed.returncode == 0, resumed.stderr
    for run_dir in (two_then_one, one_then_two):
        losses = train_losses(run_dir)
        assert sorted(losses) == list(range(1, 11))
        for step in expected:
            assert losses[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.path=/nonexistent/c4"], "/nonexistent/c4"),
        (["data=c4", "model.vocab_size=32000"], "data=sample"),
        (["trainer.precision=fp16"], "trainer.precision='fp16'"),
        (["trainer.global_batch_size=5"], "multiple of"),
        (["trainer.eval_every=0"], "trainer.eval_every=0"),
        (["trainer.log_every=-1"], "trainer.log_every=-1"),
        (["optimizer.lr=-0.001"], "optimizer.lr=-0.001"),
        (["optimizer=spam", "optimizer.lr=-0.001"], "optimizer.lr=-0.001"),
        (["data.tokenizer=data/sample/README.md"], "data.tokenizer"),
    ],
    ids=["missing-data-dir", "hub-unreachable", "bad-precision", "bad-batch", "eval-every-0", "log-every-negative",
         "negative-lr", "negative-lr-spam", "garbage-tokenizer"],
)
def test_bad_inputs_fail_with_one_clear_message(tmp_path, overrides, message):
    result = run(command(tmp_path / "run", "trainer.max_steps=2", *overrides), timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("overrides", [["optimizer=no_such_optimizer"], ["trainer.max_step=3"],
                                       ["trainer.max_steps=many"]])
def test_unknown_config_values_are_rejected_by_hydra(tmp_path, overrides):
    result = run(command(tmp_path / "run", *overrides), timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert any(word in result.stderr for word in ("Could not find", "not in struct", "Key 'max_step'",
                                                   "Value 'many'")), result.stderr


def test_unexpected_errors_keep_their_traceback(tiny_config, tmp_path, monkeypatch):
    """Only the project's own error types become one line: a bug's ValueError is not hidden."""
    import train

    def broken(cfg):
        raise ValueError("a bug")

    monkeypatch.setattr(train, "train", broken)
    with pytest.raises(ValueError, match="a bug"):
        train.run(tiny_config(tmp_path))

    def user_error(cfg):
        raise train.ConfigError("trainer.x=1 is wrong")

    monkeypatch.setattr(train, "train", user_error)
    with pytest.raises(SystemExit) as exit_info:
        train.run(tiny_config(tmp_path))
    assert exit_info.value.code == 2
