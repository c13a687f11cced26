"""Time optimizer.step() of every zoo optimizer on LLaMA parameter shapes against torch AdamW.

The parameters are fp32 tensors with the shapes of the model (no forward pass) and fixed random
gradients; AdamW (fused on CUDA, foreach on CPU) is measured in the same run and every optimizer is
reported as ms/step and as a ratio to it, with its state in bytes per parameter (tensor bytes of
`state_dict()["state"]` after the steps). Prints one JSON object.

    PYTHONPATH=. python scripts/bench_optimizer.py --device cpu --sizes 60m 350m --steps 3

`--state-bits 8 4` adds the quantized-state rows `adamw_state8`, `stable_spam_state8`, `spam_state8`
(and `_state4`); `--torchao` adds torchao's `torchao_adamw8bit` / `torchao_adamw4bit` (each compiles
one step per parameter shape: its warm-up is compilation).

Rounds are interleaved and the fastest is kept, so a busy machine biases every row alike.
`first_warmup_s` is the wall time of the first round's warm-up steps: for a compiled optimizer, its
compilation time.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stablespam import SPAM, AdaClip, AdaGN, Adafactor, AdamMini, Lion, Stabilized, StableSPAM  # noqa: E402
from stablespam.low_bit_adam import LowBitAdam  # noqa: E402
from stablespam.quantized_state import tensor_bytes  # noqa: E402

# (hidden, intermediate, layers, heads), vocab 32000, untied head: paper Table 5 ("tiny": smoke runs).
SIZES = {"tiny": (64, 176, 2, 4), "60m": (512, 1376, 8, 8), "130m": (768, 2048, 12, 12), "350m": (1024, 2736, 24, 16),
         "1b": (2048, 5461, 24, 32)}
VOCAB = 32000


def named_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    d, f, layers, _ = SIZES[size]
    shapes = [("model.embed_tokens.weight", (VOCAB, d))]
    for i in range(layers):
        prefix = f"model.layers.{i}."
        shapes += [(prefix + f"self_attn.{n}_proj.weight", (d, d)) for n in "qkvo"]
        shapes += [(prefix + "mlp.gate_proj.weight", (f, d)), (prefix + "mlp.up_proj.weight", (f, d)),
                   (prefix + "mlp.down_proj.weight", (d, f)), (prefix + "input_layernorm.weight", (d,)),
                   (prefix + "post_attention_layernorm.weight", (d,))]
    return shapes + [("model.norm.weight", (d,)), ("lm_head.weight", (VOCAB, d))]


def builders(size: str, device: torch.device, compile_: bool, state_bits: list[int] | None = None,
             torchao: bool = False) -> dict[str, Callable]:
    d, _, _, heads = SIZES[size]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    zoo: dict[str, Callable] = {
        "adamw": lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-3, **fast),
        "stable_spam": lambda named: StableSPAM([p for _, p in named], lr=1e-3),
        "stable_spam_official": lambda named: StableSPAM([p for _, p in named], lr=1e-3, mode="official",
                                                         total_steps=20000),
        "spam": lambda named: SPAM([p for _, p in named], lr=1e-3),
        "lion": lambda named: Lion([p for _, p in named], lr=1e-4),
        "lion_adagn_adaclip": lambda named: Stabilized(Lion([p for _, p in named], lr=1e-4),
                                                       [AdaGN(), AdaClip()]),
        "adam_mini": lambda named: AdamMini(named, lr=1e-3, dim=d, n_heads=heads),
        "adafactor": lambda named: Adafactor([p for _, p in named], lr=1e-3, relative_step=False,
                                             scale_parameter=False, beta1=0.9),
    }
    if compile_:
        zoo["stable_spam_compiled"] = lambda named: StableSPAM([p for _, p in named], lr=1e-3, compile=True)
    for bits in state_bits or []:
        zoo[f"adamw_state{bits}"] = lambda named, b=bits: LowBitAdam([p for _, p in named], lr=1e-3, state_bits=b)
        zoo[f"stable_spam_state{bits}"] = lambda named, b=bits: StableSPAM([p for _, p in named], lr=1e-3,
                                                                           state_bits=b)
        zoo[f"spam_state{bits}"] = lambda named, b=bits: SPAM([p for _, p in named], lr=1e-3, state_bits=b)
    if torchao:
        from torchao.optim import AdamW4bit, AdamW8bit

        zoo["torchao_adamw8bit"] = lambda named: AdamW8bit([p for _, p in named], lr=1e-3)
        zoo["torchao_adamw4bit"] = lambda named: AdamW4bit([p for _, p in named], lr=1e-3)
    return zoo


def time_step(build: Callable, size: str, device: torch.device, steps: int,
              warmup: int) -> tuple[float, float, float]:
    """(ms per timed step, seconds of the warm-up steps, which include any compilation, state bytes per parameter)."""
    gen = torch.Generator(device=device).manual_seed(0)
    named = []
    for name, shape in named_shapes(size):
        p = torch.nn.Parameter(torch.randn(shape, device=device, generator=gen) * 0.02)
        p.grad = torch.randn(shape, device=device, generator=gen) * 1e-3
        named.append((name, p))
    opt = build(named)
    start = time.perf_counter()
    for _ in range(warmup):
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps * 1e3
    state_bytes = tensor_bytes(opt.state_dict()["state"]) / sum(p.numel() for _, p in named)
    del opt, named
    gc.collect()
    return elapsed, warmup_s, state_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=["60m", "350m"], choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved rounds over all optimizers; the fastest round is reported")
    parser.add_argument("--compile", action="store_true", help="also time StableSPAM(compile=True)")
    parser.add_argument("--only", nargs="*", default=None, help="subset of optimizers (adamw always runs)")
    parser.add_argument("--state-bits", type=int, nargs="*", default=[], choices=[8, 4],
                        help="add adamw/stable_spam/spam rows with 8- or 4-bit optimizer states")
    parser.add_argument("--torchao", action="store_true", help="add torchao's AdamW8bit and AdamW4bit")
    args = parser.parse_args(argv)
    known = builders("tiny", torch.device("cpu"), args.compile, args.state_bits, args.torchao)
    unknown = set(args.only or []) - set(known)
    if unknown:
        parser.error(f"--only: unknown optimizer(s) {', '.join(sorted(unknown))} (stable_spam_compiled needs "
                     "--compile, *_state8 --state-bits 8, torchao_* --torchao)")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    result: dict[str, object] = {"device": str(device), "torch": torch.__version__,
                                 "threads": torch.get_num_threads(), "steps": args.steps, "sizes": {}}
    for size in args.sizes:
        zoo = builders(size, device, args.compile, args.state_bits, args.torchao)
        names = ["adamw"] + [n for n in zoo if n != "adamw" and (args.only is None or n in args.only)]
        n_params = sum(torch.Size(s).numel() for _, s in named_shapes(size))
        best = {name: float("inf") for name in names}
        first_warmup_s: dict[str, float] = {}
        state_bytes: dict[str, float] = {}
        for _ in range(args.repeats):
            for name in names:
                ms, warmup_s, state_bytes[name] = time_step(zoo[name], size, device, args.steps, args.warmup)
                best[name] = min(best[name], ms)
                first_warmup_s.setdefault(name, warmup_s)
        rows = {name: {"ms_per_step": round(ms, 2), "first_warmup_s": round(first_warmup_s[name], 1),
                       "state_bytes_per_param": round(state_bytes[name], 3)} for name, ms in best.items()}
        base = rows["adamw"]["ms_per_step"]
        for row in rows.values():
            row["vs_adamw"] = round(row["ms_per_step"] / base, 2)
        result["sizes"][size] = {"parameters": n_params, "tensors": len(named_shapes(size)),
                                 "adamw": "fused" if device.type == "cuda" else "foreach", "optimizers": rows}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
