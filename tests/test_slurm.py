"""scripts/slurm/train.sbatch under stand-in sbatch/srun/scontrol (tests/slurm_standin): a 2-node job,
one CPU process per node on this machine, pre-empted, requeued and resumed."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from test_train_e2e import ROOT, TINY_RUN, environment, free_port

STANDIN = ROOT / "tests" / "slurm_standin"


def job_environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The stand-ins first on PATH, then this Python's bin (accelerate); CPU processes over gloo on lo."""
    path = os.pathsep.join([str(STANDIN), str(Path(sys.executable).parent), os.environ["PATH"]])
    return {**environment(), "PATH": path, "SLURM_STANDIN_DIR": str(tmp_path), "GPUS_PER_NODE": "1",
            "MAIN_PORT": str(free_port()), "RUN_DIR": str(tmp_path / "run"), "GLOO_SOCKET_IFNAME": "lo", **extra}


def kill_tree(pid: int) -> None:
    """Kill a hung job and every descendant: torchrun's workers live in sessions of their own."""
    root = psutil.Process(pid)
    for process in [*root.children(recursive=True), root]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def test_eight_gpu_nodes_launch_one_process_group_with_the_overrides_intact(tmp_path):
    """A stand-in `accelerate` records each node's launch; node 1 fails, which fails the job unrequeued."""
    fake = tmp_path / "bin" / "accelerate"
    fake.parent.mkdir()
    fake.write_text(  # node 1 fails once node 0 has written its launch (srun then kills node 0)
        "#!/usr/bin/env python3\nimport json, os, sys, time\nnode = os.environ['SLURM_NODEID']\n"
        f"open(f'{tmp_path}/launch.tmp{{node}}', 'w').write(json.dumps(sys.argv[1:]))\n"
        f"os.replace(f'{tmp_path}/launch.tmp{{node}}', f'{tmp_path}/launch_{{node}}.json')\n"
        f"while node == '1' and not os.path.exists('{tmp_path}/launch_0.json'):\n    time.sleep(0.01)\n"
        "sys.exit(3 * int(node))\n")
    fake.chmod(0o755)
    env = job_environment(tmp_path, SLURM_GPUS_ON_NODE="8", MAIN_PORT="29999")
    env.pop("GPUS_PER_NODE")
    env["PATH"] = f"{fake.parent}{os.pathsep}{env['PATH']}"
    overrides = ["logging.run_name=two words", "optimizer.betas=[0.9,0.999]", "data.path=$HOME/c4"]
    job = subprocess.run([str(STANDIN / "sbatch"), "--nodes=2", "scripts/slurm/train.sbatch", *overrides],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert job.returncode == 3, job.stdout + job.stderr
    launches = {path.stem[-1]: json.loads(path.read_text()) for path in tmp_path.glob("launch_*.json")}
    assert sorted(launches) == ["0", "1"]
    for node, argv in launches.items():
        assert argv[:2] == ["launch", "--multi_gpu"]
        options = dict(zip(argv[2:-5:2], argv[3:-5:2]))
        assert options["--num_machines"] == "2" and options["--num_processes"] == "16"
        assert options["--machine_rank"] == node and options["--main_process_ip"] == "localhost"
        assert options["--main_process_port"] == "29999"
        assert argv[-4:] == [f"run_dir={tmp_path / 'run'}", *overrides]
    assert "requeue" not in (tmp_path / "log").read_text()


def test_two_node_job_is_preempted_requeued_and_resumes_to_the_end(tmp_path):
    """Attempt 0 gets SIGUSR1 after start-up, saves and is requeued; attempt 1 (same job id, same
    run directory) resumes and is the plain 2-node run: it completes with exit 0 and asks no requeue."""
    run_dir = tmp_path / "run"
    job = subprocess.Popen(
        [str(STANDIN / "sbatch"), "--nodes=2", "scripts/slurm/train.sbatch", *TINY_RUN, "trainer.max_steps=12",
         "checkpoint.every=0"],
        cwd=ROOT, env=job_environment(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(300, kill_tree, [job.pid])
    watchdog.start()
    output = []
    try:
        for line in job.stdout:
            output.append(line)
            if line.startswith("run ") and sum(seen.startswith("run ") for seen in output) == 1:
                # as SLURM's --signal=USR1@T does: to every process of the job step, via the stand-in srun
                os.kill(int((tmp_path / "srun.pid").read_text()), signal.SIGUSR1)
        code = job.wait()
    finally:
        watchdog.cancel()
    text = "".join(output)
    assert code == 0, text[-4000:]
    job_id = text.split("Submitted batch job ")[1].split()[0]

    # attempt 0: the ranks saved at the next logging step, the script saw PREEMPTED, requeued, exited 75
    saved = re.search(r"preemption signal received: saved \S*step_(\d+)", text)
    assert saved, "the run finished before the signal reached it"
    preempted_at = int(saved[1])
    assert f"run pre-empted at step_{preempted_at:08d} (srun exit " in text and f"requeueing job {job_id}" in text
    log = (tmp_path / "log").read_text().splitlines()
    assert log == [f"requeue {job_id}", f"exit {job_id} attempt 0 code 75", f"exit {job_id} attempt 1 code 0"]

    # attempt 1: resumes from that checkpoint, both ranks train to the end, nothing asks for a requeue
    resumed = text.split(f"requeueing job {job_id}")[1]
    assert f"resumed from step_{preempted_at:08d} at step {preempted_at}" in resumed
    assert "2 x 2 process(es)" in resumed and "done: 12 steps" in resumed
    assert not (run_dir / "PREEMPTED").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "loss" in record] == list(range(1, 13))
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_00000012").glob("rank_*.pt")) == [
        "rank_0.pt", "rank_1.pt"]
