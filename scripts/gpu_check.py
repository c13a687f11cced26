"""The GPU check that `scripts/gpu_check.sh` starts: the `gpu`-marked tests and the three benchmarks
at 350M, each in its own process under a time budget, gathered into ONE JSON file of figures.

Parts run in priority order. One that fails, times out or finds too little time left is recorded and
the next one runs; the whole check keeps within `--deadline-s`, counted from `--started-at` (the
shell script's start, so the environment setup counts too). The JSON is rewritten after every part,
so a check killed from outside still leaves what it measured. Exit status 0 only when the setup and
every part passed. bench_quant runs last because it degrades gracefully: it gets whatever time is left
and, through `--budget-s`, compiles only the quant configs that fit.

`--dry-run` (any machine, no GPU work): checks that the scripts exist, that each benchmark accepts its
arguments (the Hydra overrides compose) and that the gpu tests collect, then prints the plan as JSON.

Only the standard library is imported at module level, so any python3 can run it and record a broken
environment.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 480
MIN_PART_S = 30
"""A part is not started with less time than this left before the deadline."""
BUDGET_MARGIN_S = 75
"""Of a budgeted part's time (bench_quant), what is kept after its own budget: one more config's
compile, the timed rounds."""
TAIL_CHARS = 4000

GPU_MARKER = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\b.*\bmark\.gpu\b)", re.MULTILINE)
# 64 x 256 = 16384 tokens per step: the 350M row of shared/reference/performance-anchors.md.
ANCHOR_BATCH = ["--batch", "64", "--seq", "256"]


@dataclass(frozen=True)
class Part:
    name: str
    args: tuple[str, ...]
    """The command after the Python interpreter."""
    budget_s: int
    budget_flag: str | None = None
    """Flag through which the script gets its own time budget (its timeout less BUDGET_MARGIN_S)."""

    @property
    def is_pytest(self) -> bool:
        return self.args[:2] == ("-m", "pytest")


PARTS = [
    Part("pytest_gpu", ("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"), 120),
    Part("bench_throughput", ("scripts/bench_throughput.py", "model=llama_350m", "optimizer=stable_spam", "quant=int4",
                              "trainer.precision=pure_bf16", "--compile", *ANCHOR_BATCH, "--warmup", "3",
                              "--steps", "10"), 150),
    Part("bench_optimizer", ("scripts/bench_optimizer.py", "--sizes", "350m"), 60),
    Part("bench_optimizer_compiled", ("scripts/bench_optimizer.py", "--sizes", "350m", "--compile", "--only",
                                      "stable_spam_compiled", "--repeats", "1"), 120),
    Part("bench_quant", ("scripts/bench_quant.py", "--model", "llama_350m", "--compile", *ANCHOR_BATCH,
                         "--configs", "int4", "int4_official", "fp8", "nvfp4_recipe"), 240, budget_flag="--budget-s"),
]

DEVICE_INFO = """
import json, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps({
    "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
    "gpu": torch.cuda.get_device_name(0) if cuda else None, "gpu_count": torch.cuda.device_count(),
    "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
}))
"""


def tail(text: str) -> str:
    return text[-TAIL_CHARS:]


def gpu_test_files() -> list[str]:
    """The test files that use the `gpu` marker (`@pytest.mark.gpu` or a `pytestmark` line naming it):
    pytest is pointed at them alone, so a module elsewhere that fails to import (the default suite's
    business) neither stops nor slows the GPU check."""
    return sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").rglob("test_*.py")
                  if GPU_MARKER.search(path.read_text(errors="replace")))


def command_line(part: Part, python: str) -> list[str]:
    return [python, *part.args, *(gpu_test_files() if part.is_pytest else [])]


def device_info(python: str) -> dict:
    """torch, CUDA and GPU as the parts' interpreter sees them (in a child: no CUDA context here)."""
    info: dict = {"python_executable": python}
    try:
        out = subprocess.run([python, "-c", DEVICE_INFO], capture_output=True, text=True, timeout=120)
        info.update(json.loads(out.stdout) if out.returncode == 0 else {"error": tail(out.stderr)})
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as error:
        info["error"] = repr(error)
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    return info


def parse_json_output(stdout: str):
    """The JSON object a benchmark prints (anything a library printed before it is skipped)."""
    start = stdout.find("\n{") + 1 if not stdout.startswith("{") else 0
    return json.loads(stdout[start:])


def pytest_summary(junit: Path) -> dict:
    suites = ET.parse(junit).getroot().iter("testsuite")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                # junit's classname carries the path from pytest's rootdir, which depends on where the
                # checkout lies: keep its last part (the module, or the class)
                failed.append(f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}")
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
            "failed_tests": failed}


def run_part(part: Part, python: str, timeout_s: float, workdir: Path, log) -> dict:
    """Run one part in its own process group (killed whole on timeout, compile workers included)."""
    argv = command_line(part, python)
    junit = workdir / f"{part.name}.xml"
    if part.is_pytest:
        argv.append(f"--junitxml={junit}")
    if part.budget_flag:
        argv += [part.budget_flag, str(max(1, int(timeout_s - BUDGET_MARGIN_S)))]
    stdout_path, stderr_path = workdir / f"{part.name}.out", workdir / f"{part.name}.err"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if part.is_pytest and not gpu_test_files():
        return {"command": shlex.join(argv), "status": "failed", "error": "no test file uses the gpu marker"}
    start = time.monotonic()
    with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=stdout, stderr=stderr, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            timed_out = True
    out, err = stdout_path.read_text(errors="replace"), stderr_path.read_text(errors="replace")
    log.write(f"==== {part.name}: {shlex.join(argv)}\n---- stdout\n{out}\n---- stderr\n{err}\n")
    log.flush()
    record = {"command": shlex.join(argv), "rc": rc, "wall_s": round(time.monotonic() - start, 1),
              "timeout_s": round(timeout_s), "result": None}
    if timed_out:
        status = "timeout"
    elif part.is_pytest:
        status = "passed" if rc == 0 else "failed"
        if rc == 5:
            record["error"] = "no gpu-marked test was collected"
        if junit.exists():
            record["result"] = pytest_summary(junit)
    else:
        try:
            record["result"] = parse_json_output(out)
            status = "passed" if rc == 0 else "failed"
        except ValueError:
            status = "failed"
    record["status"] = status
    if status != "passed":
        record["stderr_tail"] = tail(err)
    return record


def output_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return ROOT / "outputs" / "gpu_check.json"


def check(args: argparse.Namespace) -> int:
    """The real check: setup record, device info, every part in order, JSON rewritten after each."""
    path = output_path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = args.started_at + args.deadline_s
    setup = {"status": args.setup_status, "wall_s": round(args.setup_s, 1)}
    if args.setup_status == "failed" and args.setup_log:
        setup["log_tail"] = tail(Path(args.setup_log).read_text(errors="replace"))
    report: dict = {"ok": False, "dry_run": False, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                                             time.localtime(args.started_at)),
                    "deadline_s": args.deadline_s, "host": platform.node(), "setup": setup,
                    "device": device_info(sys.executable), "parts": {}}

    def write() -> None:
        report["wall_s"] = round(time.time() - args.started_at, 1)
        report["failed"] = [name for name, part in report["parts"].items() if part["status"] != "passed"]
        report["ok"] = setup["status"] != "failed" and not report["failed"] and len(report["parts"]) == len(PARTS)
        path.write_text(json.dumps(report, indent=2) + "\n")

    no_gpu = None if report["device"].get("gpu") else "no CUDA device visible to " + sys.executable
    with tempfile.TemporaryDirectory() as tmp, path.with_suffix(".log").open("w") as log:
        for part in PARTS:
            left = deadline - time.time()
            if no_gpu or left < MIN_PART_S:
                report["parts"][part.name] = {
                    "status": "skipped", "command": shlex.join(command_line(part, sys.executable)),
                    "error": no_gpu or f"{left:.0f} s left before the {args.deadline_s} s deadline"}
            else:
                report["parts"][part.name] = run_part(part, sys.executable, min(part.budget_s, left), Path(tmp), log)
            write()
    print(json.dumps({"ok": report["ok"], "output": str(path), "wall_s": report["wall_s"],
                      "parts": {name: p["status"] for name, p in report["parts"].items()}}, indent=2))
    return 0 if report["ok"] else 1


def check_commands() -> list[str]:
    """Problems with the benchmark commands, found by their own argument parsers (no GPU work)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_optimizer
        import bench_quant
        import bench_throughput
    except Exception as error:  # an environment without the project's dependencies, a broken module
        return [f"cannot import the benchmarks: {error!r}"]

    modules = {"bench_throughput.py": bench_throughput, "bench_quant.py": bench_quant,
               "bench_optimizer.py": bench_optimizer}
    bench_throughput.register_configs()
    problems = []
    for part in PARTS:
        if part.is_pytest:
            continue
        argv = list(part.args[1:]) + ([part.budget_flag, "1"] if part.budget_flag else [])
        module = modules[Path(part.args[0]).name]
        try:
            parsed = module.parse_args(argv)
        except SystemExit:
            problems.append(f"{part.name}: {part.args[0]} rejects its arguments (see stderr)")
            continue
        if module is bench_throughput:
            for overrides in (parsed.overrides, bench_throughput.baseline_overrides(parsed.overrides)):
                try:
                    bench_throughput.compose_config(overrides)
                except Exception as error:  # Hydra's errors share no base class worth naming
                    problems.append(f"{part.name}: overrides {overrides} do not compose: {error}")
    return problems


def dry_run(args: argparse.Namespace) -> int:
    """Everything the check would run exists and parses, and the gpu tests collect; prints the plan."""
    scripts = ["scripts/setup_env.sh"] + [part.args[0] for part in PARTS if not part.is_pytest]
    problems = [f"missing {script}" for script in scripts if not (ROOT / script).is_file()]
    files = gpu_test_files()
    # Collect in a child while this process imports the benchmarks: both mostly wait on imports.
    collect = subprocess.Popen([sys.executable, "-m", "pytest", "-m", "gpu", "--co", "-q", "-p", "no:cacheprovider",
                                *files], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) if files else None
    if not problems:
        problems += check_commands()
    gpu_tests = []
    if collect:
        collected, _ = collect.communicate(timeout=300)
        gpu_tests = [line for line in collected.splitlines() if "::" in line]
        if collect.returncode != 0:
            problems.append(f"pytest -m gpu --co {' '.join(files)} exited {collect.returncode}:\n{tail(collected)}")
    print(json.dumps({
        "ok": not problems, "dry_run": True, "python": sys.executable, "output": str(output_path(args.output)),
        "deadline_s": args.deadline_s, "gpu_test_files": files, "gpu_tests": gpu_tests, "problems": problems,
        "parts": [{"name": part.name, "command": shlex.join(command_line(part, sys.executable)),
                   "budget_s": part.budget_s} for part in PARTS],
    }, indent=2))
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--output", help="the JSON file (default $OUT/gpu_check.json, else outputs/gpu_check.json)")
    parser.add_argument("--deadline-s", type=float, default=float(os.environ.get("GPU_CHECK_DEADLINE_S", DEADLINE_S)))
    parser.add_argument("--started-at", type=float, default=time.time(), help="epoch seconds the check started")
    parser.add_argument("--setup-status", default="given", help="given | reused | installed | failed")
    parser.add_argument("--setup-s", type=float, default=0.0)
    parser.add_argument("--setup-log", help="the setup's output, quoted in the JSON when it failed")
    args = parser.parse_args(argv)
    return dry_run(args) if args.dry_run else check(args)


if __name__ == "__main__":
    sys.exit(main())
