"""Training-step throughput: tokens/s, MFU and peak memory for one configuration, against a baseline.

The candidate is any composition of the Hydra groups (model, optimizer, quant, precision, compile,
trainer.grad_clip); the baseline, measured in the same process right before it, is the same model in
pure bf16 with torch AdamW and no quantization (same compile and trainer.* settings), so the printed
ratio compares like with like on whatever device runs it. Prints one JSON object.

Each timed step is `trainer.step.train_step`, the step `train.py` runs (loss over the real next-token
targets, gradient norm, optimizer step, zero_grad), on a model and optimizer prepared by one
`Accelerator`, over random tokens in the trainer's batch form. After the warm-up steps the device is
synchronised once before and once after `--steps` back-to-back steps, as the training loop (which
reads the device only on logging steps) runs them; tokens/s counts the real targets the steps saw.

bf16_mixed: an `Accelerator` fixes its mixed precision for the whole process, so both runs share one
`Accelerator(mixed_precision="no")` and a bf16_mixed model gets the forward that
`Accelerator(mixed_precision="bf16").prepare` would give it: `torch.autocast(device, bfloat16)` around
the forward, outputs cast back to fp32 (`autocast_forward`).

    python scripts/bench_throughput.py model=llama_130m optimizer=stable_spam quant=int4 --steps 10
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import convert_outputs_to_fp32
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
import quant  # noqa: E402
import stablespam  # noqa: E402
from trainer.config import register_configs  # noqa: E402
from trainer.metrics import device_peak_flops, peak_memory_gib  # noqa: E402
from trainer.step import nonfinite, train_step  # noqa: E402

BASELINE_OVERRIDES = ["optimizer=adamw", "quant=none", "trainer.precision=pure_bf16"]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def baseline_overrides(overrides: list[str]) -> list[str]:
    """The candidate's model and trainer settings (clipping, compile...) with the baseline's optimizer,
    quantization and precision."""
    return [o for o in overrides if o.startswith(("model=", "model.", "trainer."))] + BASELINE_OVERRIDES


def random_micro_batches(vocab_size: int, batch: int, seq: int, accum: int,
                         device: torch.device) -> list[dict[str, torch.Tensor]]:
    """`accum` micro-batches splitting `batch` random sequences, in the trainer's batch form: targets
    are the next tokens, all real. Seeded, so every config sees the same tokens."""
    tokens = torch.randint(0, vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": part[:, :-1].contiguous().to(device), "targets": part[:, 1:].contiguous().to(device)}
            for part in tokens.chunk(accum)]


def autocast_forward(model: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """Give `model` the forward `Accelerator(mixed_precision="bf16").prepare` gives it (bf16 autocast,
    outputs cast to fp32), for a process whose Accelerator has mixed_precision="no"."""
    model.forward = convert_outputs_to_fp32(torch.autocast(device_type, dtype=torch.bfloat16)(model.forward))
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg, accelerator: Accelerator, batch: int, seq: int, accum: int, steps: int, warmup: int,
            compile_model: bool) -> dict:
    """Build the run as `train.py` does (quantize, optimizer, compile, prepare) and time `train_step`."""
    device = accelerator.device
    torch.manual_seed(0)
    precision = cfg.trainer.precision
    model = models.build_model(cfg.model, torch.bfloat16 if precision == "pure_bf16" else torch.float32)
    converter = quant.build_converter(cfg.quant)
    converter.seed(0, 0)
    model = converter.convert(model).to(device)
    optimizer = stablespam.build_optimizer(model, cfg.optimizer, total_steps=cfg.trainer.max_steps)
    if compile_model:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if precision == "bf16_mixed":
        autocast_forward(model, device.type)
    micro_batches = random_micro_batches(cfg.model.vocab_size, batch, seq, accum, device)

    def step():
        return train_step(model, optimizer, micro_batches, accelerator, grad_clip=cfg.trainer.grad_clip,
                          skip_if=nonfinite if cfg.trainer.nonfinite_policy == "skip" else None)

    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    outs = [step() for _ in range(steps)]
    synchronize(device)
    elapsed = time.perf_counter() - start
    targets = sum(int(out.targets) for out in outs)
    tokens_per_s = targets / elapsed
    peak = device_peak_flops(device, precision)
    result = {
        "optimizer": cfg.optimizer.name, "quant": converter.describe(), "precision": precision,
        "compile": compile_model, "grad_clip": cfg.trainer.grad_clip,
        "step_ms": elapsed / steps * 1e3, "tokens_per_s": tokens_per_s, "targets_per_step": targets // steps,
        "mfu": tokens_per_s * models.matmul_flops_per_token(cfg.model, seq) / peak if peak else None,
        "peak_mem_gib": peak_memory_gib(device),
        "last_loss": float(outs[-1].loss), "last_grad_norm": float(outs[-1].grad_norm),
    }
    # Release this run (the Accelerator keeps references, Dynamo keeps compiled code) before the next.
    del model, optimizer, outs
    accelerator.free_memory()
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the candidate, e.g. quant=int4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (the global batch)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per step; must divide --batch")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (or trainer.compile=true)")
    args = parser.parse_args(argv)
    if args.accum < 1 or args.batch % args.accum:
        parser.error(f"--accum {args.accum} must be >= 1 and divide --batch {args.batch}")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    register_configs()
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision="no")
    device = accelerator.device
    candidate_cfg = compose_config(args.overrides)
    baseline_cfg = compose_config(baseline_overrides(args.overrides))
    run = dict(accelerator=accelerator, batch=args.batch, seq=args.seq, accum=args.accum, steps=args.steps,
               warmup=args.warmup, compile_model=args.compile or candidate_cfg.trainer.compile)
    baseline = measure(baseline_cfg, **run)
    candidate = measure(candidate_cfg, **run)
    print(json.dumps({
        "model": candidate_cfg.model.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "batch": args.batch, "accum": args.accum, "seq": args.seq,
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        "baseline": baseline, "candidate": candidate,
        "throughput_ratio_vs_baseline": candidate["tokens_per_s"] / baseline["tokens_per_s"],
    }, indent=2))


if __name__ == "__main__":
    main()
