"""Train the same tiny LLaMA with StableSPAM mode="official" and mode="corrected" and print curves.

Data: a SYNTHETIC language, not text: a fixed random first-order Markov chain over 512 tokens
(each token has 8 likely successors), so the loss floor is known-ish and runs are deterministic.
Parameters are pure bf16 (the papers' setting), hyperparameters are the paper's (4-bit:
0.7/0.9/0.999; BF16: 0.85/0.99999/0.999) with a small reset interval so several resets happen,
and the LR follows the papers' schedule shape (linear warmup, cosine to 0.1x).

    PYTHONPATH=. python scripts/compare_stablespam_modes.py --steps 400 --reset-interval 100

With `--runs DIR...` it trains nothing and summarizes finished train.py runs instead (real data,
one run per mode/setting, see docs/optimizers.md): per run the validation curve, the final
validation loss and perplexity, and the mean training loss over the last `--tail` steps (over the
logged ones: train with trainer.log_every=1 to average every step).

    PYTHONPATH=. python scripts/compare_stablespam_modes.py --runs /tmp/modes/int4_official /tmp/modes/int4_corrected
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import ModelConfig, build_model  # noqa: E402
from stablespam import StableSPAM  # noqa: E402

PRESETS = {"4bit": dict(gamma1=0.7, gamma2=0.9, gamma3=0.999), "bf16": dict(gamma1=0.85, gamma2=0.99999, gamma3=0.999)}


def markov_batches(steps: int, batch: int, seq: int, vocab: int, seed: int) -> tuple[list[torch.Tensor], float]:
    """Token batches from a fixed random Markov chain, and the chain's entropy rate (nats)."""
    gen = torch.Generator().manual_seed(1234)
    logits = torch.full((vocab, vocab), -1e9)
    successors = torch.stack([torch.randperm(vocab, generator=gen)[:8] for _ in range(vocab)])
    logits.scatter_(1, successors, torch.randn(vocab, 8, generator=gen) * 1.5)
    probs = logits.softmax(-1)
    entropy = -(probs.clamp_min(1e-30).log() * probs).sum(-1).mean().item()
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        tokens = torch.empty(batch, seq, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        for i in range(1, seq):
            tokens[:, i] = torch.multinomial(probs[tokens[:, i - 1]], 1, generator=gen).squeeze(1)
        batches.append(tokens)
    return batches, entropy


def train(mode: str, preset: str, batches: list[torch.Tensor], args: argparse.Namespace) -> list[float]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                    num_attention_heads=4, vocab_size=args.vocab), dtype=torch.bfloat16)
    opt = StableSPAM(model.parameters(), lr=args.lr, reset_interval=args.reset_interval,
                     total_steps=len(batches), mode=mode, **PRESETS[preset])
    warmup = max(1, len(batches) // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, len(batches) - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    return losses


def summarize_run(run_dir: Path, tail: int) -> dict[str, object]:
    """Validation curve, final validation loss/perplexity and tail-mean training loss of a train.py run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    train_losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    last_step = max(train_losses)
    window = [loss for step, loss in train_losses.items() if step > last_step - tail]
    final_step = max(val)
    return {
        "val_loss": {step: round(loss, 4) for step, loss in sorted(val.items())},
        "val_ppl": {step: round(math.exp(loss), 2) for step, loss in sorted(val.items())},
        "final_step": final_step,
        "final_val_loss": round(val[final_step], 4),
        "final_val_ppl": round(math.exp(val[final_step]), 2),
        f"train_loss_mean_last_{tail}": round(sum(window) / len(window), 4),
        "train_loss_records_in_window": len(window),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--reset-interval", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--presets", nargs="+", default=["4bit", "bf16"], choices=sorted(PRESETS))
    parser.add_argument("--every", type=int, default=20, help="curve resolution (mean loss per window)")
    parser.add_argument("--runs", type=Path, nargs="+", help="summarize these train.py run dirs instead of training")
    parser.add_argument("--tail", type=int, default=50, help="with --runs: steps in the training-loss mean")
    args = parser.parse_args()
    if args.runs:
        print(json.dumps({str(d): summarize_run(d, args.tail) for d in args.runs}, indent=1))
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result: dict[str, object] = {"data": "synthetic Markov chain (512 tokens, 8 successors each)",
                                 "params": "bf16", "steps": args.steps, "reset_interval": args.reset_interval,
                                 "lr": args.lr, "runs": {}}
    start = time.time()
    for seed in args.seeds:
        batches, entropy = markov_batches(args.steps, args.batch, args.seq, args.vocab, seed)
        result["entropy_rate_nats"] = round(entropy, 4)
        for preset in args.presets:
            for mode in ("official", "corrected"):
                losses = train(mode, preset, batches, args)
                curve = [round(sum(losses[i:i + args.every]) / len(losses[i:i + args.every]), 4)
                         for i in range(0, len(losses), args.every)]
                tail = losses[-args.every:]
                key = f"{preset}/{mode}/seed{seed}"
                result["runs"][key] = {"final_loss": round(sum(tail) / len(tail), 4), "curve": curve}
                print(key, result["runs"][key], file=sys.stderr, flush=True)
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
