"""Training-step throughput of each `quant` config against the high-precision baseline(s).

One process, same model shape, same random tokens: forward + backward + AdamW step per
iteration, warm-up steps excluded. Prints one JSON object (tokens/s, ratio vs baseline).

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
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import ModelConfig, build_model  # noqa: E402
from quant import build_converter  # noqa: E402

SIMULATED = ["int8", "int4", "fp4", "mxfp4", "nvfp4", "int4_official", "fp4_official"]


def load_yaml(group: str, name: str):
    cfg = OmegaConf.load(ROOT / "configs" / group / f"{name}.yaml")
    cfg.pop("defaults", None)
    return cfg


class Runner:
    """One config's model, optimizer and step; models are built once and timed in rounds."""

    def __init__(self, model_cfg: ModelConfig, quant_name: str, dtype: torch.dtype, args) -> None:
        torch.manual_seed(0)
        model = build_model(model_cfg, dtype=dtype)
        self.converter = build_converter(load_yaml("quant", quant_name))
        self.converter.convert(model)
        model.to(args.device)
        self.fused = args.device.startswith("cuda")
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=1e-4, fused=self.fused, foreach=not self.fused
        )
        self.model = torch.compile(model) if args.compile else model
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, model_cfg.vocab_size, (args.batch, args.seq), generator=generator)
        self.tokens = tokens.to(args.device)
        self.name = quant_name if quant_name != "none" else str(dtype).replace("torch.", "")
        self.dtype = str(dtype).replace("torch.", "")
        self.seconds_per_step: list[float] = []

    def step(self) -> None:
        loss = self.model(input_ids=self.tokens, labels=self.tokens).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.fused:
            torch.cuda.synchronize()

    def time(self, steps: int) -> None:
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        self.seconds_per_step.append((time.perf_counter() - start) / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_tiny", help="a configs/model/*.yaml name")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; best one kept")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--configs", nargs="*", default=None, help="quant configs (default all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_cfg = ModelConfig(**OmegaConf.to_container(load_yaml("model", args.model)))
    on_gpu = args.device.startswith("cuda")
    # bf16 parameters on GPU (as the anchors); fp32 on CPU, where bf16 GEMMs are slow.
    quant_dtype = torch.bfloat16 if on_gpu else torch.float32
    baselines = [torch.bfloat16] if on_gpu else [torch.float32, torch.bfloat16]
    names = args.configs or SIMULATED + (["fp8"] if on_gpu else [])

    runners = [Runner(model_cfg, "none", dtype, args) for dtype in baselines]
    runners += [Runner(model_cfg, name, quant_dtype, args) for name in names]
    for runner in runners:
        for _ in range(args.warmup):
            runner.step()
    # Interleaved rounds, best round per config: robust to other load on a shared machine.
    for _ in range(args.rounds):
        for runner in runners:
            runner.time(args.steps)
    tokens_per_step = args.batch * args.seq
    results = []
    for runner in runners:
        best = min(runner.seconds_per_step)
        results.append({
            "config": runner.name,
            "describe": runner.converter.describe(),
            "param_dtype": runner.dtype,
            "tokens_per_s": round(tokens_per_step / best, 1),
            "ms_per_step": round(1000 * best, 2),
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
        "seq": args.seq,
        "steps": args.steps,
        "rounds": args.rounds,
        "baseline": results[0]["config"],
        "torch": torch.__version__,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
