"""The loop's parts on their own: progress bar, metrics file, MFU peaks, gradient norm, resume rules."""
from __future__ import annotations

import io
import json
import math

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from rich.console import Console

from trainer import resume
from trainer.config import ConfigError
from trainer.metrics import device_peak_flops
from trainer.reporting import progress_bar, truncate_metrics
from trainer.spikes import SpikeDetector
from trainer.step import RunningTotals, StepOutput, gradient_norm


def test_progress_bar_keeps_step_eta_and_metrics_at_80_columns():
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system=None)
    progress, task = progress_bar(console, 20000)
    progress.update(task, completed=1234, summary="loss 3.456 | val_ppl 31.7 | lr 1.00e-03 | grad_norm 0.25 | tok/s 123,456")
    console.print(progress.get_renderable())
    line = [l for l in out.getvalue().splitlines() if l.strip()][-1]
    assert len(line) <= 80
    assert "step 1234/20000" in line and "eta" in line and "loss 3.456" in line


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (0, 2, 4, 6, 8)))
    truncate_metrics(path, 4)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [0, 2, 4]
    truncate_metrics(path, -1)
    assert path.read_text() == ""


def test_mfu_peak_follows_the_precision(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_peak_flops(cuda, "bf16_mixed") == device_peak_flops(cuda, "pure_bf16") == 989e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert device_peak_flops(cuda, "fp32") is None, "plain fp32 has no tensor-core peak"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert device_peak_flops(cuda, "fp32") == 494.7e12
    assert device_peak_flops(torch.device("cpu"), "bf16_mixed") is None


def test_gradient_norm_without_clipping_leaves_gradients_untouched():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model(torch.randn(5, 4)).square().sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    reference = math.sqrt(sum(float(g.double().square().sum()) for g in before))
    assert float(gradient_norm(model, accelerator, 0.0)) == pytest.approx(reference, rel=1e-6)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    assert float(gradient_norm(model, accelerator, reference / 2)) == pytest.approx(reference, rel=1e-6)
    clipped = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
    assert clipped == pytest.approx(reference / 2, rel=1e-5)


def test_running_totals_count_real_tokens_and_remember_the_first_bad_step():
    totals = RunningTotals(torch.device("cpu"))

    def out(loss, targets, finite=True):
        return StepOutput(torch.tensor(loss, dtype=torch.float64), torch.tensor(1.0), torch.tensor(targets),
                          torch.tensor(finite))

    totals.add(out(2.0, 100), 1)
    totals.add(out(4.0, 50), 2)
    assert totals.nonfinite_step() is None
    window = totals.read_window()
    assert window["loss"] == 3.0 and window["window_tokens"] == 150 and window["tokens_seen"] == 150
    totals.add(out(float("nan"), 10, finite=False), 3)
    totals.add(out(float("nan"), 10, finite=False), 4)
    assert totals.nonfinite_step() == 3
    restored = RunningTotals(torch.device("cpu"))
    restored.load_state_dict(totals.state_dict())
    assert restored.read_window()["tokens_seen"] == 170 and restored.nonfinite_step() == 3


def test_running_totals_count_skips_and_the_longest_run_on_the_device():
    totals = RunningTotals(torch.device("cpu"))

    def out(loss, skipped, finite=True):
        return StepOutput(torch.tensor(loss, dtype=torch.float64), torch.tensor(1.0), torch.tensor(10),
                          torch.tensor(finite), torch.tensor(skipped))

    for step, (loss, skipped, finite) in enumerate([(2.0, False, True), (9.0, True, True),
                                                    (float("nan"), True, False), (4.0, False, True)], 1):
        totals.add(out(loss, skipped, finite), step)
    window = totals.read_window()
    assert window["loss"] == 3.0, "skipped steps stay out of the mean loss"
    assert (window["skipped_steps"], window["spike_skips"], window["window_skipped"]) == (2, 1, 2)
    assert totals.skip_runs() == (2, 3)
    totals.add(out(1.0, True), 5)
    assert totals.read_window()["window_skipped"] == 1 and totals.skip_runs() == (2, 5)
    restored = RunningTotals(torch.device("cpu"))
    restored.load_state_dict(totals.state_dict())
    assert restored.skip_runs() == (2, 5) and restored.read_window()["skipped_steps"] == 3


def test_spike_detector_records_only_taken_steps():
    detector = SpikeDetector(window=2, z=1.0, device=torch.device("cpu"))
    for loss, taken in ((1.0, True), (50.0, False), (2.0, True)):
        detector.accept(torch.tensor(loss), torch.tensor(1.0), taken=torch.tensor(taken))
    assert int(detector.seen) == 2
    assert detector.history[0].tolist() == [1.0, 2.0]


def test_changed_settings_are_listed_and_unhonourable_ones_refused():
    saved = OmegaConf.create({"model": {"hidden_size": 64}, "optimizer": {"lr": 1e-3, "kind": "adamw"},
                              "trainer": {"max_steps": 20, "precision": "fp32"}, "run_dir": "a"})
    current = OmegaConf.create({"model": {"hidden_size": 64}, "optimizer": {"lr": 1e-2, "kind": "adamw"},
                                "trainer": {"max_steps": 40, "precision": "bf16_mixed"}, "run_dir": "b"})
    changes = resume.changed_settings(saved, current)
    assert changes == [("optimizer.lr", 1e-3, 1e-2), ("trainer.max_steps", 20, 40),
                       ("trainer.precision", "fp32", "bf16_mixed")]
    resume.refuse_unhonourable(changes)
    assert resume.describe(changes).startswith("resuming with changed settings: optimizer.lr 0.001 -> 0.01")
    for key, old, new in [("model.hidden_size", 64, 128), ("data.seq_len", 128, 256), ("optimizer.kind", "adamw", "spam"),
                          ("trainer.precision", "fp32", "pure_bf16"), ("data.tokenizer", "a", "b")]:
        with pytest.raises(ConfigError, match=f"^{key} cannot change on resume"):
            resume.refuse_unhonourable([(key, old, new)])
