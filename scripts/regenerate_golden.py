"""Regenerate the golden training losses in tests/golden/*.json after an intended change.

    python scripts/regenerate_golden.py            # every case
    python scripts/regenerate_golden.py adam_fp4   # some

Each case trains a tiny config for 20 steps on CPU with one thread and stores the 20 logged losses
(`trainer.log_every=1`); tests/test_golden_losses.py trains the same and compares. Review the diff of
the JSON files before committing: a change there means training itself changed.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
THREADS = 1
"""Losses differ in the last digits between thread counts (reduction order), so both sides use one."""

TINY = [
    "model=llama_tiny", "data=sample", "trainer.precision=fp32", "trainer.cpu=true", "logging.wandb_mode=disabled",
    "logging.progress=lines", "data.seq_len=32", "data.val_tokens=1024", "trainer.micro_batch_size=2",
    "trainer.global_batch_size=2", "trainer.max_steps=20", "trainer.warmup_steps=2", "trainer.log_every=1",
    "trainer.eval_every=20", "checkpoint.every=0", "checkpoint.export_hf=false", "optimizer.lr=3e-3",
]
CASES = {
    "stable_spam_int4": ["optimizer=stable_spam", "quant=int4", "optimizer.reset_interval=8"],
    "adam_fp4": ["optimizer=adam", "quant=fp4"],
    "gradient_stabilizer_none": ["optimizer=gradient_stabilizer", "quant=none"],
}


def train_losses(overrides: list[str], run_dir: Path) -> list[float]:
    """Train `overrides` in this process with THREADS threads; the losses of steps 1, 2, ... as logged."""
    from hydra import compose, initialize_config_dir

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import train

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*overrides, f"run_dir={run_dir}"])
        train.train(cfg)
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in sorted(rows, key=lambda r: r["step"]) if "loss" in row]


def main(names: list[str]) -> int:
    unknown = set(names) - set(CASES)
    if unknown:
        print(f"error: unknown case(s) {sorted(unknown)}; cases: {', '.join(CASES)}", file=sys.stderr)
        return 2
    for name in names or CASES:
        overrides = [*TINY, *CASES[name]]
        with tempfile.TemporaryDirectory() as tmp:
            losses = train_losses(overrides, Path(tmp))
        golden = {"overrides": overrides, "threads": THREADS, "torch": torch.__version__, "losses": losses}
        (GOLDEN / f"{name}.json").write_text(json.dumps(golden, indent=1) + "\n")
        print(f"{name}: {len(losses)} losses, last {losses[-1]:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
