"""Training-step throughput of each `quant` config against the high-precision baseline(s).

One process, same model shape, same random tokens. Each step is `trainer.step.train_step`, the step
`train.py` runs (loss over the real next-token targets, gradient norm, AdamW step, zero_grad), on a
model and optimizer prepared by one `Accelerator`; warm-up steps excluded, the device synchronised
only around each timed round. Prints one JSON object (tokens/s of real targets, ratio vs baseline,
`warmup_s`: the warm-up's wall time, compilation included). Compiling every config at 350M takes
minutes: `--configs` in priority order with `--budget-s` keeps what fits in a time budget.

    python scripts/bench_quant.py --model llama_tiny --device cpu --steps 5
    python scripts/bench_quant.py --model llama_350m --device cuda --compile --batch 64 --seq 256
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_throughput import random_micro_batches, synchronize  # noqa: E402
from models import ModelConfig, build_model  # noqa: E402
from quant import build_converter  # noqa: E402
from trainer.step import train_step  # noqa: E402

SIMULATED = ["int8", "int4", "fp4", "mxfp4", "nvfp4", "int4_official", "fp4_official", "nvfp4_recipe", "quartet",
             "mxfp4_backward"]


def load_yaml(group: str, name: str):
    cfg = OmegaConf.load(ROOT / "configs" / group / f"{name}.yaml")
    cfg.pop("defaults", None)
    return cfg


class Runner:
    """One config's model, optimizer and step; models are built once and timed in rounds."""

    def __init__(self, model_cfg: ModelConfig, quant_name: str, dtype: torch.dtype, accelerator: Accelerator,
                 args) -> None:
        torch.manual_seed(0)
        model = build_model(model_cfg, dtype=dtype)
        self.converter = build_converter(load_yaml("quant", quant_name))
        self.converter.convert(model)
        self.device = accelerator.device
        model.to(self.device)
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=not fused)
        if args.compile:
            model = torch.compile(model)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.accelerator = accelerator
        self.micro_batches = random_micro_batches(model_cfg.vocab_size, args.batch, args.seq, args.accum,
                                                  self.device)
        self.name = quant_name if quant_name != "none" else str(dtype).replace("torch.", "")
        self.dtype = str(dtype).replace("torch.", "")
        self.seconds_per_step: list[float] = []
        self.targets_per_step = 0
        self.warmup_s = 0.0

    def step(self):
        return train_step(self.model, self.optimizer, self.micro_batches, self.accelerator)

    def warm_up(self, steps: int) -> None:
        """The untimed first steps; `warmup_s` is their wall time, which includes any compilation."""
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        self.warmup_s = time.perf_counter() - start

    def time(self, steps: int) -> None:
        synchronize(self.device)
        start = time.perf_counter()
        outs = [self.step() for _ in range(steps)]
        synchronize(self.device)
        self.seconds_per_step.append((time.perf_counter() - start) / steps)
        self.targets_per_step = sum(int(out.targets) for out in outs) // steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_tiny", help="a configs/model/*.yaml name")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; best one kept")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (the global batch)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per step; must divide --batch")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--configs", nargs="*", default=None, help="quant configs in priority order (default all)")
    parser.add_argument("--budget-s", type=float, default=0,
                        help="build and warm up (compile) no further config once this many seconds have passed; "
                             "those are listed under skipped_for_budget (0 = no limit)")
    args = parser.parse_args(argv)
    if args.accum < 1 or args.batch % args.accum:
        parser.error(f"--accum {args.accum} must be >= 1 and divide --batch {args.batch}")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    missing = [f"configs/{group}/{name}.yaml" for group, name in [("model", args.model)]
               + [("quant", name) for name in args.configs or []]
               if not (ROOT / "configs" / group / f"{name}.yaml").exists()]
    if missing:
        parser.error(f"no {', '.join(missing)}")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_cfg = ModelConfig(**OmegaConf.to_container(load_yaml("model", args.model)))
    on_gpu = args.device == "cuda"
    # bf16 parameters on GPU (as the anchors); fp32 on CPU, where bf16 GEMMs are slow.
    quant_dtype = torch.bfloat16 if on_gpu else torch.float32
    baselines = [torch.bfloat16] if on_gpu else [torch.float32, torch.bfloat16]
    names = args.configs or SIMULATED + (["fp8"] if on_gpu else [])
    # Every config compiles the same model code, so each adds cache entries to the same frames:
    # past Dynamo's default limit (8) the later configs would silently run eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               8 * (len(baselines) + len(names)))
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision="no")

    start = time.perf_counter()
    runners, skipped = [], []
    for name, dtype in [("none", dtype) for dtype in baselines] + [(name, quant_dtype) for name in names]:
        if runners and args.budget_s and time.perf_counter() - start > args.budget_s:
            skipped.append(name if name != "none" else str(dtype).replace("torch.", ""))
            continue
        runner = Runner(model_cfg, name, dtype, accelerator, args)
        runner.warm_up(args.warmup)
        runners.append(runner)
    # Interleaved rounds, best round per config: robust to other load on a shared machine.
    for _ in range(args.rounds):
        for runner in runners:
            runner.time(args.steps)
    results = []
    for runner in runners:
        best = min(runner.seconds_per_step)
        results.append({
            "config": runner.name,
            "describe": runner.converter.describe(),
            "param_dtype": runner.dtype,
            "targets_per_step": runner.targets_per_step,
            "tokens_per_s": round(runner.targets_per_step / best, 1),
            "ms_per_step": round(1000 * best, 2),
            "warmup_s": round(runner.warmup_s, 1),
        })
    reference = results[0]["tokens_per_s"]
    for row in results:
        row["ratio_vs_baseline"] = round(row["tokens_per_s"] / reference, 3)
    print(json.dumps({
        "model": args.model,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "threads": torch.get_num_threads(),
        "compile": args.compile,
        "batch": args.batch,
        "accum": args.accum,
        "seq": args.seq,
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
        "baseline": results[0]["config"],
        "torch": torch.__version__,
        "results": results,
        "skipped_for_budget": skipped,
    }, indent=2))


if __name__ == "__main__":
    main()
