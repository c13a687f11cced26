"""The benchmark scripts run end to end, through `trainer.step.train_step` where they time a training
step, and report each configuration against the baseline measured in the same run (their timings are
not asserted: speed is measured by the scripts, not by tests)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# The compiled variant (20 s, a torch.compile of the step) runs with -m slow; the compiled step itself
# is tested in tests/test_optim_stable_spam.py.
@pytest.mark.parametrize("compile_flag", [[], pytest.param(["--compile", "--only", "stable_spam_compiled"],
                                                           marks=pytest.mark.slow)])
def test_bench_optimizer_reports_each_optimizer_as_a_ratio_to_adamw(compile_flag):
    out = subprocess.run(
        [sys.executable, "scripts/bench_optimizer.py", "--device", "cpu", "--sizes", "tiny", "--steps", "1",
         "--warmup", "1", "--repeats", "1", *compile_flag],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    rows = json.loads(out)["sizes"]["tiny"]["optimizers"]
    expected = {"adamw", "stable_spam_compiled"} if compile_flag else {
        "adamw", "stable_spam", "stable_spam_official", "spam", "lion", "lion_adagn_adaclip",
        "adam_mini", "adafactor"}
    assert set(rows) == expected
    base = rows["adamw"]["ms_per_step"]
    for row in rows.values():
        assert row["ms_per_step"] > 0 and row["first_warmup_s"] >= 0
        assert row["vs_adamw"] == pytest.approx(row["ms_per_step"] / base, abs=0.006)


def run_json(*argv: str) -> dict:
    out = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout)


def test_bench_throughput_times_train_step_against_the_bf16_adamw_baseline():
    # bf16_mixed exercises the autocast forward; --accum 2 the micro-batch split.
    report = run_json("scripts/bench_throughput.py", "model=llama_tiny", "optimizer=stable_spam", "quant=int4",
                      "trainer.precision=bf16_mixed", "--device", "cpu", "--batch", "2", "--seq", "32",
                      "--accum", "2", "--steps", "1", "--warmup", "1")
    baseline, candidate = report["baseline"], report["candidate"]
    assert (baseline["optimizer"], baseline["precision"]) == ("adamw", "pure_bf16")
    assert (candidate["optimizer"], candidate["precision"]) == ("stable_spam", "bf16_mixed")
    assert candidate["quant"].startswith("int4")
    for run in (baseline, candidate):
        assert run["targets_per_step"] == 2 * 32
        assert run["tokens_per_s"] > 0 and run["mfu"] is None
        assert math.isfinite(run["last_loss"]) and math.isfinite(run["last_grad_norm"])
    assert report["throughput_ratio_vs_baseline"] == pytest.approx(candidate["tokens_per_s"] / baseline["tokens_per_s"])


def test_bench_quant_times_train_step_against_the_high_precision_baselines():
    report = run_json("scripts/bench_quant.py", "--model", "llama_tiny", "--device", "cpu", "--batch", "2",
                      "--seq", "32", "--steps", "1", "--warmup", "1", "--rounds", "1", "--configs", "int4")
    rows = {row["config"]: row for row in report["results"]}
    assert list(rows) == ["float32", "bfloat16", "int4"] and report["baseline"] == "float32"
    for row in rows.values():
        assert row["targets_per_step"] == 2 * 32 and row["tokens_per_s"] > 0
        assert row["ratio_vs_baseline"] == pytest.approx(row["tokens_per_s"] / rows["float32"]["tokens_per_s"], abs=2e-3)


AUTOCAST_MATCHES_ACCELERATE = """
import sys
import torch
sys.path.insert(0, "scripts")
from accelerate import Accelerator
from bench_throughput import autocast_forward, compose_config, random_micro_batches
import models
from trainer.config import register_configs
from trainer.step import token_loss_sum

register_configs()
cfg = compose_config(["model=llama_tiny"])
batch = random_micro_batches(cfg.model.vocab_size, 2, 16, 1, torch.device("cpu"))[0]

def loss_and_grads(model):
    loss = token_loss_sum(model, batch)
    loss.backward()
    return [loss] + [p.grad for p in model.parameters()]

def build():
    torch.manual_seed(0)
    return models.build_model(cfg.model, torch.float32)

accelerate_bf16 = loss_and_grads(Accelerator(cpu=True, mixed_precision="bf16").prepare(build()))
ours = loss_and_grads(autocast_forward(build(), "cpu"))
fp32 = loss_and_grads(build())
assert all(torch.equal(a, b) for a, b in zip(accelerate_bf16, ours))
assert not torch.equal(ours[0], fp32[0])
print("same")
"""


def test_bench_throughput_bf16_mixed_forward_is_the_one_accelerate_prepares():
    """One process can hold only one Accelerator precision, so the benchmark re-creates accelerate's
    bf16 forward itself: same loss and gradients, bit for bit, as `Accelerator(mixed_precision="bf16")`."""
    out = subprocess.run([sys.executable, "-c", AUTOCAST_MATCHES_ACCELERATE], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "same", out.stderr[-3000:]
