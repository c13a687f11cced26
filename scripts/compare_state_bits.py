"""Train the quickstart (tiny LLaMA, Stable-SPAM, INT4, bundled corpus, CPU) with 32-, 8- and 4-bit
optimizer states through train.py, one run after the other, and compare them.

Per run (state bits x `--seeds`): the final validation perplexity, its ratio to the 32-bit run's of
the same seed, and the optimizer state of the last checkpoint in bytes per parameter (tensor bytes of
the saved state; `optimizer.pt` on disk).
Prints one JSON object; with `--docs FILE` also writes the table between the markers
`<!-- compare_state_bits:start -->` and `<!-- compare_state_bits:end -->` of that file.

    PYTHONPATH=. python scripts/compare_state_bits.py --out /tmp/state_bits --docs docs/optimizers.md

`--reuse` summarizes finished run directories under `--out` instead of training again. `--threads`
(default 1) sets OMP_NUM_THREADS of the runs: on a shared 2-core machine two intra-op threads of the
tiny model's small ops wait on each other and run 3-4x slower than one (measured).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stablespam.quantized_state import tensor_bytes  # noqa: E402

BASE_OVERRIDES = ["+experiment=quickstart", "trainer.cpu=true", "logging.wandb_mode=disabled",
                  "logging.progress=lines", "checkpoint.export_hf=false"]
MARKERS = ("<!-- compare_state_bits:start -->", "<!-- compare_state_bits:end -->")


def command(bits: int, seed: int, run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "train.py", *BASE_OVERRIDES, f"optimizer.state_bits={bits}", f"trainer.seed={seed}",
            f"run_dir={run_dir}", *extra]


def summarize(run_dir: Path) -> dict[str, object]:
    """Final validation perplexity and optimizer-state bytes per parameter of a finished run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    final_step = max(val)
    checkpoint = max((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    optimizer_file = checkpoint / "optimizer.pt"
    state = torch.load(optimizer_file, map_location="cpu", weights_only=False)["state"]
    params = sum(t.numel() for t in load_file(checkpoint / "model.safetensors").values())
    return {
        "final_step": final_step,
        "val_ppl": {step: round(math.exp(loss), 1) for step, loss in sorted(val.items())},
        "final_val_ppl": round(math.exp(val[final_step]), 1),
        "state_bytes_per_param": round(tensor_bytes(state) / params, 3),
        "optimizer_pt_bytes_per_param": round(optimizer_file.stat().st_size / params, 3),
        "parameters": params,
    }


def markdown(result: dict[str, object]) -> str:
    runs: dict[str, dict[str, object]] = result["runs"]  # type: ignore[assignment]
    lines = ["| state_bits | seed | val perplexity at 100 / 200 / 300 (final) | final vs 32-bit | state bytes/param "
             "| optimizer.pt bytes/param |", "|---|---|---|---|---|---|"]
    for name, run in runs.items():
        bits, seed = name.split("/")
        base = runs[f"32/{seed}"]
        ratio = run["final_val_ppl"] / base["final_val_ppl"]  # type: ignore[operator]
        curve = " / ".join(str(v) for step, v in run["val_ppl"].items() if step > 0)  # type: ignore[union-attr]
        lines.append(f"| {bits} | {seed} | {curve} | {ratio:.3f}x | {run['state_bytes_per_param']} "
                     f"| {run['optimizer_pt_bytes_per_param']} |")
    return "\n".join(lines)


def write_docs(path: Path, table: str, cmd: str) -> None:
    text = path.read_text()
    start, end = MARKERS
    block = f"{start}\n```\n{cmd}\n```\n\n{table}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {start} ... {end} block")
    path.write_text(pattern.sub(lambda _: block, text))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/state_bits"), help="parent of the run dirs")
    parser.add_argument("--bits", type=int, nargs="+", default=[32, 8, 4], choices=[32, 8, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="trainer.seed of the runs")
    parser.add_argument("--reuse", action="store_true", help="summarize existing runs, train nothing")
    parser.add_argument("--docs", type=Path, help="markdown file whose marked block receives the table")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides for every run")
    args = parser.parse_args(argv)
    if 32 not in args.bits:
        parser.error("--bits must include 32 (the reference)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    result: dict[str, object] = {"runs": {}, "seconds": {}}
    for seed in args.seeds:
        for bits in sorted(args.bits, reverse=True):
            name, run_dir = f"{bits}/{seed}", args.out / f"state_bits_{bits}_seed_{seed}"
            if not args.reuse:
                start = time.time()
                subprocess.run(command(bits, seed, run_dir, args.overrides), cwd=ROOT, env=env, check=True)
                result["seconds"][name] = round(time.time() - start, 1)  # type: ignore[index]
            result["runs"][name] = summarize(run_dir)  # type: ignore[index]
    cmd = " ".join([f"OMP_NUM_THREADS={args.threads} python train.py", *BASE_OVERRIDES, "optimizer.state_bits=BITS",
                    "trainer.seed=SEED", "run_dir=...", *args.overrides])
    result["command"] = cmd
    print(json.dumps(result, indent=1))
    if args.docs:
        write_docs(args.docs, markdown(result), cmd)


if __name__ == "__main__":
    main()
