"""Reports are computed from what the runs logged: synthetic run directories with known metrics give
known cells (seed means, published numbers beside ours at paper scale), the runs' costs, the list of
missing, unfinished, diverged and mismatched runs, and readable PNG figures."""
from __future__ import annotations

import importlib
import json
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trainer.report import FIGURES, load_run, report
from trainer.study import DIVERGED, Run, Study, save_study

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0
WINDOW_TOKENS, TOKENS_PER_S, LOG_EVERY = 120, 40.0, 2


def write_run(run_dir: Path, *, lr: float, seed: int, max_steps: int = 10, last_step: int = 10,
              val_ppl: float | None = None) -> list[dict]:
    """A run directory as train.py leaves it: config.yaml and metrics.jsonl up to `last_step`."""
    run_dir.mkdir(parents=True)
    config = {"optimizer": {"name": "adam", "lr": lr}, "quant": {"name": "int4"}, "model": {"name": "llama_tiny"},
              "data": {"name": "sample", "seq_len": 64, "packing": True, "val_tokens": 4096},
              "trainer": {"max_steps": max_steps, "seed": seed, "global_batch_size": 8, "warmup_steps": 1,
                          "lr_schedule": "cosine", "min_lr_ratio": 0.1, "precision": "fp32"}}
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    rows = []
    for step in range(LOG_EVERY, last_step + 1, LOG_EVERY):
        window = step // LOG_EVERY
        rows.append({"step": step, "time": T0 + window * WINDOW_TOKENS / TOKENS_PER_S, "loss": 9.0 - 0.1 * step,
                     "ppl": 1.0, "lr": lr, "grad_norm": 1.0 + seed + 0.01 * step, "grad_norm_clipped": 1.0,
                     "tokens_seen": window * WINDOW_TOKENS, "tokens_per_s": TOKENS_PER_S, "mfu": None,
                     "peak_mem_gib": None, "skipped_steps": 0})
        if step == max_steps and val_ppl is not None:
            rows.append({"step": step, "time": rows[-1]["time"] + 3.0, "val_loss": 0.0, "val_ppl": val_ppl})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def table(text: str, first_header: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    out = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = cells[1:]
    return out


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """rows a, b x columns x, y x seeds 0, 1: every state a run can be in; reported once."""
    tmp_path = tmp_path_factory.mktemp("study")
    runs = [Run(f"{row}-{col}-s{seed}", row, col, seed,
                ("optimizer=adam", f"optimizer.lr={0.001 if col == 'x' else 0.003}", f"trainer.seed={seed}"))
            for row in "ab" for col in "xy" for seed in (0, 1)]
    study = Study(name="synthetic", scale="paper", title="Synthetic table", rows={"a": "Adam A", "b": "Adam B"},
                  columns={"x": "X", "y": "Y"}, published={"a": {"x": 9.5}}, runs=runs, slurm=[])
    save_study(study, tmp_path)
    write_run(tmp_path / "a-x-s0", lr=0.001, seed=0, val_ppl=10.0)
    write_run(tmp_path / "a-x-s1", lr=0.001, seed=1, val_ppl=12.0)
    write_run(tmp_path / "a-y-s0", lr=0.003, seed=0, val_ppl=20.0)
    write_run(tmp_path / "a-y-s1", lr=0.003, seed=1, last_step=6)  # unfinished
    for seed in (0, 1):
        write_run(tmp_path / f"b-x-s{seed}", lr=0.001, seed=seed, last_step=4)
        (tmp_path / f"b-x-s{seed}" / DIVERGED).write_text("non-finite loss or gradient norm at step 5\n")
    # b-y-s0 was never started; b-y-s1 holds a run with another learning rate.
    write_run(tmp_path / "b-y-s1", lr=0.002, seed=1, val_ppl=30.0)
    report([tmp_path])
    return tmp_path


def test_the_table_holds_seed_means_of_the_logged_final_perplexity_beside_the_published_ones(study_dir):
    text = (study_dir / "report.md").read_text()
    rows = table(text, "optimizer")
    assert rows["Adam A"] == [f"{statistics.fmean([10.0, 12.0]):.2f} ± {statistics.stdev([10.0, 12.0]):.2f}",
                              "9.50", "20.00 (1/2 seeds)", "—"]
    assert rows["Adam B"] == ["diverged", "—", "30.00 (1/2 seeds)", "—"]
    assert "Study `synthetic`, scale `paper`: 4 of 8 runs finished." in text
    summary = json.loads((study_dir / "report.json").read_text())
    assert summary["table"]["a"]["x"] == {"ppl": [10.0, 12.0], "mean": 11.0, "published": 9.5}


def test_the_report_lists_every_run_that_is_not_finished_and_every_config_mismatch(study_dir):
    text = (study_dir / "report.md").read_text()
    section = text.split("## Missing or unfinished runs")[1].split("## Runs")[0]
    assert "- `a-y-s1`: unfinished: step 6 of 10" in section
    assert "- `b-x-s0`: diverged (last logged step 4): non-finite loss or gradient norm at step 5" in section
    assert "- `b-y-s0`: missing (no config.yaml)" in section
    assert "- `b-y-s1`: config mismatch: optimizer.lr is 0.002, the study says 0.003" in section
    assert "a-x-s0" not in section


def test_costs_per_run_come_from_the_logged_windows(study_dir):
    text = (study_dir / "report.md").read_text()
    runs = table(text, "run")
    rows = [json.loads(line) for line in (study_dir / "a-x-s0" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    train_time = sum(WINDOW_TOKENS / r["tokens_per_s"] for r in train)
    wall = rows[-1]["time"] - (train[0]["time"] - WINDOW_TOKENS / train[0]["tokens_per_s"])
    header = ["status", "optimizer", "quant", "model", "lr", "clip", "seed", "steps", "final val ppl", "final loss",
              "tokens/s", "MFU", "peak GiB", "train time", "wall clock"]
    row = dict(zip(header, runs["`a-x-s0`"]))
    assert row["tokens/s"] == f"{train[-1]['tokens_seen'] / train_time:,.0f}"
    assert row["train time"] == f"0m{round(train_time):02d}s" and row["wall clock"] == f"0m{round(wall):02d}s"
    assert (row["status"], row["steps"], row["final val ppl"], row["final loss"]) == (
        "done", "10/10", "10.00", f"{train[-1]['loss']:.4f}")
    assert dict(zip(header, runs["`b-y-s0`"]))["status"] == "missing"
    assert load_run(study_dir / "a-x-s0").wall_s == pytest.approx(wall)


def test_the_figures_are_pngs_with_content(study_dir):
    for name in FIGURES:
        data = (study_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_a_resume_with_changed_settings_is_read_from_its_newest_config(tmp_path):
    write_run(tmp_path / "run", lr=0.003, seed=1, last_step=6)
    newer = OmegaConf.load(tmp_path / "run" / "config.yaml")
    newer.trainer.max_steps = 6
    OmegaConf.save(newer, tmp_path / "run" / "config.step_00000004.yaml")
    run = load_run(tmp_path / "run")
    assert run.max_steps == 6 and run.status == "unfinished"  # and no evaluation at step 6 was logged


def test_run_directories_without_a_study_get_a_row_each(tmp_path):
    write_run(tmp_path / "one", lr=0.001, seed=0, val_ppl=15.0)
    write_run(tmp_path / "two", lr=0.002, seed=0, last_step=4)
    path = report([tmp_path / "one", tmp_path / "two"], tmp_path / "out")
    text = path.read_text()
    assert path == tmp_path / "out" / "report.md"
    assert table(text, "run")["one"] == ["15.00"] and table(text, "run")["two"] == ["—"]
    assert "- `two`: unfinished: step 4 of 10" in text


def test_report_cli_refuses_a_path_that_is_no_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    cli = importlib.import_module("report")
    assert cli.main([str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
