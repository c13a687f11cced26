"""scripts/gpu_check.sh on a machine without a GPU: its dry run finds everything it would run and the
gpu tests collect; its runner records every part (JSON output, failure, timeout, pytest counts) and
keeps going, on stand-in parts that need no GPU."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    module = importlib.import_module("gpu_check")
    monkeypatch.setattr(module, "device_info", lambda python: {"gpu": "stand-in GPU", "torch": "x"})
    return module


def test_dry_run_checks_every_part_and_lists_the_benchmark_commands():
    env = {**os.environ, "STABLESPAM_PYTHON": sys.executable}
    env.pop("OUT", None)
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    plan = json.loads(out.stdout)
    assert plan["ok"] and plan["dry_run"] and not plan["problems"]
    assert plan["output"] == str(REPO / "outputs" / "gpu_check.json")
    commands = {part["name"]: part["command"] for part in plan["parts"]}
    assert set(commands) == {"pytest_gpu", "bench_throughput", "bench_optimizer", "bench_optimizer_compiled",
                             "bench_quant"}
    assert "-m pytest -m gpu" in commands["pytest_gpu"]
    assert ("scripts/bench_throughput.py model=llama_350m optimizer=stable_spam quant=int4 "
            "trainer.precision=pure_bf16 --compile --batch 64 --seq 256") in commands["bench_throughput"]
    assert commands["bench_optimizer"].endswith("scripts/bench_optimizer.py --sizes 350m")
    assert "scripts/bench_optimizer.py --sizes 350m --compile" in commands["bench_optimizer_compiled"]
    assert "scripts/bench_quant.py --model llama_350m --compile --batch 64 --seq 256" in commands["bench_quant"]
    assert all(test.split("::")[0] in plan["gpu_test_files"] for test in plan["gpu_tests"])


def test_check_records_every_part_and_keeps_going(gpu_check, monkeypatch, tmp_path):
    tests = tmp_path / "test_stand_in_gpu.py"
    tests.write_text("import pytest\n\n"
                     "@pytest.mark.gpu\ndef test_ok():\n    pass\n\n"
                     "@pytest.mark.gpu\ndef test_broken():\n    assert False\n\n"
                     "@pytest.mark.gpu\n@pytest.mark.skip\ndef test_skipped():\n    pass\n\n"
                     "def test_not_gpu():\n    assert False\n")
    monkeypatch.setattr(gpu_check, "gpu_test_files", lambda: [str(tests)])
    Part = gpu_check.Part
    monkeypatch.setattr(gpu_check, "PARTS", [
        Part("pytest_gpu", ("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"), 60),
        Part("prints_json", ("-c", "import json; print('a library chats'); print(json.dumps({'x': 1}, indent=2))"), 60),
        Part("fails", ("-c", "import sys; sys.exit('broken')"), 60),
        Part("hangs", ("-c", "import time; time.sleep(60)"), 1),
        Part("budgeted", ("-c", "import json, sys; print(json.dumps(sys.argv[1:]))"), 100, budget_flag="--budget-s"),
    ])
    output = tmp_path / "out" / "gpu_check.json"
    assert gpu_check.main(["--output", str(output)]) == 1
    report = json.loads(output.read_text())
    parts = report["parts"]
    assert {name: part["status"] for name, part in parts.items()} == {
        "pytest_gpu": "failed", "prints_json": "passed", "fails": "failed", "hangs": "timeout", "budgeted": "passed"}
    assert parts["pytest_gpu"]["result"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1,
                                             "failed_tests": ["test_stand_in_gpu::test_broken"]}
    assert parts["prints_json"]["result"] == {"x": 1}
    assert "broken" in parts["fails"]["stderr_tail"]
    assert parts["hangs"]["wall_s"] < 30
    assert parts["budgeted"]["result"] == ["--budget-s", str(100 - gpu_check.BUDGET_MARGIN_S)]
    assert report["ok"] is False and report["failed"] == ["pytest_gpu", "fails", "hangs"]
    assert report["device"]["gpu"] == "stand-in GPU" and report["wall_s"] >= 0
    assert "==== prints_json" in output.with_suffix(".log").read_text()


def test_check_skips_what_the_deadline_leaves_no_time_for(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "PARTS", [gpu_check.Part("late", ("-c", "pass"), 60)])
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main(["--deadline-s", "10"]) == 1
    late = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["late"]
    assert late["status"] == "skipped" and "deadline" in late["error"]
