"""Training-step throughput: tokens/s, MFU and peak memory for one configuration, against a baseline.

The candidate is any composition of the Hydra groups (model, optimizer, quant, precision, compile);
the baseline, measured in the same process right before it, is the same model in pure bf16 with
torch AdamW and no quantization (same compile setting), so the printed ratio compares like with like
on whatever device runs it. Random tokens, a few warm-up steps, then timed steps. Prints one JSON
object.

    python scripts/bench_throughput.py model=llama_130m optimizer=stable_spam quant=int4 --steps 10
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
import quant  # noqa: E402
import stablespam  # noqa: E402
from trainer.config import register_configs  # noqa: E402
from trainer.metrics import device_peak_flops  # noqa: E402

BASELINE_OVERRIDES = ["optimizer=adamw", "quant=none", "trainer.precision=pure_bf16"]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def measure(cfg, device: torch.device, batch: int, seq: int, steps: int, warmup: int, compile_model: bool) -> dict:
    torch.manual_seed(0)
    precision = cfg.trainer.precision
    dtype = torch.bfloat16 if precision == "pure_bf16" else torch.float32
    model = models.build_model(cfg.model, dtype)
    converter = quant.build_converter(cfg.quant)
    converter.seed(0, 0)
    model = converter.convert(model).to(device)
    optimizer = stablespam.build_optimizer(model, cfg.optimizer, total_steps=cfg.trainer.max_steps)
    step_model = torch.compile(model) if compile_model else model
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16_mixed"
                else contextlib.nullcontext())
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), device=device)

    def train_step() -> None:
        with autocast:
            logits = step_model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        train_step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step()
        sync()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens_per_s = batch * seq / step_s
    peak = device_peak_flops(device)
    return {
        "optimizer": cfg.optimizer.name, "quant": converter.describe(), "precision": precision,
        "compile": compile_model, "step_ms": step_s * 1e3, "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * models.matmul_flops_per_token(cfg.model, seq) / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the candidate, e.g. quant=int4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    register_configs()
    device = torch.device(args.device)
    candidate_cfg = compose_config(args.overrides)
    model_overrides = [o for o in args.overrides if o.startswith(("model=", "model."))]
    baseline_cfg = compose_config(model_overrides + BASELINE_OVERRIDES)
    run = dict(device=device, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
               compile_model=args.compile)
    baseline = measure(baseline_cfg, **run)
    candidate = measure(candidate_cfg, **run)
    print(json.dumps({
        "model": candidate_cfg.model.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "batch": args.batch, "seq": args.seq, "timed_steps": args.steps,
        "baseline": baseline, "candidate": candidate,
        "throughput_ratio_vs_baseline": candidate["tokens_per_s"] / baseline["tokens_per_s"],
    }, indent=2))


if __name__ == "__main__":
    main()
