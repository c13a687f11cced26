"""Studies expand into the right runs (names, overrides, seeds, per-scale recipes), compose as train.py
would, skip finished runs, resume interrupted ones, and go through Hydra's launchers (local in-process;
SLURM through hydra-submitit-launcher, checked up to the submission, which needs a cluster)."""
from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
from hydra import initialize_config_dir

from trainer import study as S

ROOT = Path(__file__).resolve().parents[1]
REPO_STUDIES = ["gradient_stabilizer", "lr_sensitivity", "table1_fp4", "table1_int4", "table2_bf16",
                "table3_stabilizers", "table4_ablation", "fp4_recipes", "state_bits_int4"]


def overrides_of(run: S.Run) -> dict[str, str]:
    return dict(o.split("=", 1) for o in run.overrides)


def test_the_repository_holds_the_papers_studies():
    assert set(REPO_STUDIES) <= set(S.available_studies())
    assert "_base" not in S.available_studies()


@pytest.mark.parametrize("scale", S.SCALES)
@pytest.mark.parametrize("name", REPO_STUDIES)
def test_every_study_is_its_grid_and_its_first_and_last_runs_compose(name, scale, tmp_path):
    study = S.load_study(name, scale)
    assert len(study.runs) == len(study.rows) * len(study.columns) * 1  # one seed each
    assert [r.name for r in study.runs] == [f"{row}-{col}-s0" for row in study.rows for col in study.columns]
    configs = S.compose_runs([study.runs[0], study.runs[-1]], tmp_path)
    for run, cfg in zip((study.runs[0], study.runs[-1]), configs):
        assert cfg.run_dir == str(tmp_path / run.name) and cfg.logging.run_name == run.name
        assert cfg.model.name == ("llama_tiny" if scale == "tiny" else overrides_of(run)["model"])
        assert cfg.data.name == ("sample" if scale == "tiny" else "c4")
        assert cfg.trainer.precision == ("fp32" if scale == "tiny" else "pure_bf16")
    if scale == "tiny":
        assert not study.published
        assert configs[0].trainer.max_steps == 200
    else:
        assert all(study.published.values())


def test_table1_int4_at_paper_scale_is_the_papers_table(tmp_path):
    study = S.load_study("table1_int4", "paper")
    assert list(study.rows.values()) == ["Adam", "Adam+GradClip", "Adafactor", "SPAM", "Stable-SPAM", "Adam (BF16)"]
    assert list(study.columns.values()) == ["130M", "350M", "1B"]
    runs = {run.name: overrides_of(run) for run in study.runs}
    assert runs["stable_spam-350m-s0"] == {
        "+experiment": "paper_4bit", "optimizer": "stable_spam_4bit", "quant": "int4_official", "model": "llama_350m",
        "optimizer.lr": "0.0004", "trainer.seed": "0"}
    assert runs["stable_spam-1b-s0"]["optimizer.lr"] == "0.0002"
    assert "optimizer.lr" not in runs["adam-1b-s0"]  # the preset's
    assert runs["adam_gradclip-130m-s0"]["trainer.grad_clip"] == "1.0"
    assert runs["adam_bf16-130m-s0"]["quant"] == "none"
    assert study.published["stable_spam"] == {"130m": 24.33, "350m": 17.76, "1b": 17.42}
    cfg = S.compose_runs([next(r for r in study.runs if r.name == "stable_spam-350m-s0")], tmp_path)[0]
    assert (cfg.optimizer.lr, cfg.optimizer.name, cfg.quant.name) == (4e-4, "stable_spam_4bit", "int4_official")
    assert (cfg.trainer.max_steps, cfg.trainer.global_batch_size, cfg.data.packing) == (20000, 512, False)


def test_tiny_scale_keeps_the_rows_and_shrinks_step_counted_settings():
    study = S.load_study("lr_sensitivity", "tiny")
    assert len(study.runs) == 16
    runs = {run.name: overrides_of(run) for run in study.runs}
    assert {runs[f"adam-{col}-s0"]["optimizer.lr"] for col in study.columns} == {"0.001", "0.003", "0.01", "0.03"}
    assert runs["stable_spam-lr1e-2-s0"]["optimizer.reset_interval"] == "100"
    assert runs["gradient_stabilizer-lr3e-2-s0"]["optimizer"] == "gradient_stabilizer"
    assert runs["adam_gradclip-lr1e-3-s0"]["trainer.grad_clip"] == "1.0"
    paper = S.load_study("lr_sensitivity", "paper")
    assert list(paper.rows) == list(study.rows) and len(paper.columns) == 5
    assert overrides_of(paper.runs[0])["trainer.max_steps"] == "10000"


def test_a_cell_overrides_its_row_and_learning_rates_fall_back_by_model():
    study = S.load_study("gradient_stabilizer", "paper")
    runs = {run.name: overrides_of(run) for run in study.runs}
    assert runs["stable_spam-bf16-s0"]["optimizer"] == "stable_spam_bf16"
    assert runs["stable_spam-bf16-s0"]["optimizer.lr"] == "0.0008"
    assert runs["stable_spam-int4-s0"]["optimizer"] == "stable_spam_4bit"
    assert runs["stable_spam-int4-s0"]["optimizer.lr"] == "0.001"
    tiny = {run.name: overrides_of(run) for run in S.load_study("gradient_stabilizer", "tiny").runs}
    # No tiny entry in the cell's or row's mapping: the tiny scale's learning rate applies.
    assert tiny["stable_spam-bf16-s0"]["optimizer.lr"] == "0.003"
    assert tiny["stable_spam-bf16-s0"]["optimizer.total_steps"] == "-1"


def write_study(tmp_path: Path, text: str) -> str:
    path = tmp_path / "custom.yaml"
    path.write_text(text)
    return str(path)


def test_seeds_multiply_runs_and_command_line_overrides_come_last(tmp_path):
    path = write_study(tmp_path, """
title: custom
quant: int4
seeds: [1, 7]
overrides: [trainer.grad_clip=0.5]
rows:
  a: {label: A, optimizer: adam, overrides: [trainer.grad_clip=2.0]}
  b: {label: B, optimizer: lion, lr: {llama_tiny: 1.0e-4}}
columns:
  x: {label: X}
""")
    study = S.load_study(path, "tiny", ["trainer.max_steps=9", "optimizer.lr=5e-3"])
    assert [r.name for r in study.runs] == ["a-x-s1", "a-x-s7", "b-x-s1", "b-x-s7"]
    assert [r.seed for r in study.runs] == [1, 7, 1, 7]
    a1 = overrides_of(study.runs[0])
    assert a1["trainer.seed"] == "1" and a1["trainer.grad_clip"] == "2.0"  # the row beats the study
    assert a1["trainer.max_steps"] == "9" and a1["optimizer.lr"] == "5e-3"  # the command line beats both
    assert sum(o.startswith("trainer.max_steps=") for o in study.runs[0].overrides) == 1
    assert overrides_of(S.load_study(path, "tiny").runs[2])["optimizer.lr"] == "0.0001"


@pytest.mark.parametrize("text, message", [
    ("rows: {a: {label: A, optimizer: adamm}}\ncolumns: {x: {label: X}}", "optimizer='adamm' is not one of"),
    ("rows: {a: {label: A, optimizer: adam, lr: 1.0e-3}}\ncolumns: {x: {label: X, lr: 2.0e-3}}",
     "row and column both set ['lr']"),
    ("rows: {a: {label: A, optimizer: adam, overrides: [trainer.grad_clip=1.0]}}\n"
     "columns: {x: {label: X, overrides: [trainer.grad_clip=2.0]}}", "row and column both set ['trainer.grad_clip']"),
    ("rows: {a: {label: A, optimiser: adam}}\ncolumns: {x: {label: X}}", "unknown key(s) ['optimiser']"),
    ("rows: {a b: {label: A, optimizer: adam}}\ncolumns: {x: {label: X}}", "id 'a b' must match"),
    ("rows: {a: {label: A, optimizer: adam}}\ncolumns: {x: {label: X}}\ncells: {a/y: {quant: none}}",
     "cells.a/y must be"),
    ("rows: {a: {label: A, optimizer: adam}}\ncolumns: {x: {label: X}}\nseeds: []", "seeds must be"),
    ("rows: {a: {label: A, optimizer: adam, lr: fast}}\ncolumns: {x: {label: X}}", "lr must be a number"),
])
def test_a_wrong_study_fails_with_one_line_naming_the_key(tmp_path, text, message):
    with pytest.raises(S.StudyError) as error:
        S.load_study(write_study(tmp_path, "quant: int4\n" + text), "tiny")
    assert message in str(error.value)


def test_unknown_study_and_scale():
    with pytest.raises(S.StudyError, match="studies: fp4_recipes, gradient_stabilizer, lr_sensitivity, "):
        S.load_study("table9", "tiny")
    with pytest.raises(S.StudyError, match="scale 'huge'"):
        S.load_study("table1_int4", "huge")


def test_run_status_reads_the_run_directory(tmp_path):
    def checkpoint(step: int) -> None:
        directory = tmp_path / "checkpoints" / f"step_{step:08d}"
        directory.mkdir(parents=True)
        (directory / "manifest.json").write_text("{}")

    assert S.run_status(tmp_path, 10) == "new"
    (tmp_path / "checkpoints" / ".incomplete_step_00000004").mkdir(parents=True)  # a killed save
    assert S.run_status(tmp_path, 10) == "new"
    checkpoint(4)
    assert S.run_status(tmp_path, 10) == "partial" and S.latest_checkpoint_step(tmp_path) == 4
    (tmp_path / S.DIVERGED).write_text("error")
    assert S.run_status(tmp_path, 10) == "diverged"
    checkpoint(10)
    assert S.run_status(tmp_path, 10) == "done"
    assert S.run_status(tmp_path, 12) == "diverged"  # a longer max_steps: not finished any more


MICRO = """
title: micro
quant: none
rows:
  adam: {label: Adam, optimizer: adam}
  stable_spam: {label: Stable-SPAM, optimizer: stable_spam}
columns:
  tiny: {label: tiny}
"""
MICRO_OVERRIDES = ["data.seq_len=32", "data.val_tokens=256", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
                   "trainer.max_steps=4", "trainer.warmup_steps=1", "trainer.eval_every=4", "trainer.log_every=1",
                   "checkpoint.every=2", "checkpoint.keep_last=2"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def markdown_rows(report: str, first_header: str) -> dict[str, list[str]]:
    """The cells of the markdown table whose header starts with `first_header`, by first column."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.usefixtures("keep_signal_handlers")
def test_a_micro_study_runs_end_to_end_skips_finished_runs_and_resumes_interrupted_ones(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import reproduce

    study_file, out = write_study(tmp_path, MICRO), tmp_path / "study"
    argv = [study_file, "--out", str(out), *MICRO_OVERRIDES]
    launched = []
    real_launch = S.launch
    monkeypatch.setattr(S, "launch", lambda study, d, runs, *a: launched.append([r.name for r in runs]) or
                        real_launch(study, d, runs, *a))
    assert reproduce.main(argv) == 0
    assert launched == [["adam-tiny-s0", "stable_spam-tiny-s0"]]

    report = (out / "report.md").read_text()
    table = markdown_rows(report, "optimizer")
    for row, label in (("adam", "Adam"), ("stable_spam", "Stable-SPAM")):
        final = [m for m in metrics(out / f"{row}-tiny-s0") if m.get("val_loss") is not None and m["step"] == 4]
        assert len(final) == 1
        assert float(table[label][0]) == pytest.approx(math.exp(final[0]["val_loss"]), abs=0.006)
    assert "None: every run finished." in report
    for figure in ("val_ppl.png", "train_loss.png", "grad_norm.png", "ppl_vs_lr.png", "throughput.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Again: nothing to run.
    assert reproduce.main(argv) == 0
    assert len(launched) == 1

    # An interrupted run (its final checkpoint gone) resumes from step 2 and ends where it did.
    before = [m["loss"] for m in metrics(out / "adam-tiny-s0") if "loss" in m]
    for path in sorted((out / "adam-tiny-s0" / "checkpoints" / "step_00000004").iterdir()):
        path.unlink()
    (out / "adam-tiny-s0" / "checkpoints" / "step_00000004").rmdir()
    planned = dict((run.name, status) for run, status in S.plan(S.load_study(study_file, "tiny", MICRO_OVERRIDES), out))
    assert planned == {"adam-tiny-s0": "partial", "stable_spam-tiny-s0": "done"}
    assert reproduce.main(argv) == 0
    assert launched[-1] == ["adam-tiny-s0"]
    assert [m["loss"] for m in metrics(out / "adam-tiny-s0") if "loss" in m] == before


@pytest.mark.usefixtures("keep_signal_handlers")
def test_a_diverged_run_is_recorded_reported_skipped_and_retried_on_request(tmp_path, monkeypatch):
    import trainer.step
    from trainer.report import report

    real_loss, calls = trainer.step.token_loss_sum, []

    def nan_at_the_third_training_step(model, batch):  # of the first run, Adam's
        loss = real_loss(model, batch)
        calls.append(model.training)
        return loss * float("nan") if model.training and calls.count(True) == 3 else loss

    monkeypatch.setattr(trainer.step, "token_loss_sum", nan_at_the_third_training_step)
    study_file, out = write_study(tmp_path, MICRO), tmp_path / "study"
    assert S.reproduce(study_file, "tiny", overrides=MICRO_OVERRIDES, out=out) == (out, 0)
    marker = (out / "adam-tiny-s0" / S.DIVERGED).read_text()
    assert marker.startswith("non-finite loss or gradient norm at step 3;")
    assert not (out / "stable_spam-tiny-s0" / S.DIVERGED).exists()
    text = report([out]).read_text()
    assert markdown_rows(text, "optimizer")["Adam"] == ["diverged"]
    assert "- `adam-tiny-s0`: diverged (last logged step 2): non-finite loss or gradient norm at step 3;" in text

    launched = []
    monkeypatch.setattr(S, "launch", lambda study, d, runs, *a: launched.append([r.name for r in runs]) or [])
    S.reproduce(study_file, "tiny", overrides=MICRO_OVERRIDES, out=out)
    assert launched == []
    S.reproduce(study_file, "tiny", overrides=MICRO_OVERRIDES, out=out, retry_diverged=True)
    assert launched == [["adam-tiny-s0"]] and not (out / "adam-tiny-s0" / S.DIVERGED).exists()


def test_the_slurm_launcher_config_composes_and_submits_one_requeueable_job_per_run(tmp_path, monkeypatch):
    import cloudpickle
    import submitit

    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR2")  # restored (unset) after the test
    monkeypatch.setattr(submitit.JobEnvironment, "USR_SIG", "USR2")
    study = S.load_study("table1_int4", "paper")
    with initialize_config_dir(config_dir=str(S.CONFIGS), version_base="1.3"):
        cfg = S.launcher_config("slurm", study, tmp_path, ["hydra.launcher.partition=gpu",
                                                           "hydra.launcher.gpus_per_node=8"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min, launcher.max_num_timeout) == (
        "gpu", 8, 2880, 30)
    assert cfg.hydra.sweep.dir == str(tmp_path)

    submitted = {}

    class Executor:
        def __init__(self, folder, **init):
            submitted["init"] = {"folder": folder, **init}

        def update_parameters(self, **params):
            submitted["params"] = params

        def map_array(self, fn, *args):
            submitted["pickled"] = cloudpickle.dumps(fn)  # what submitit sends to the nodes
            submitted["jobs"] = list(zip(*args))
            return []

    monkeypatch.setattr(submitit, "AutoExecutor", Executor)
    runs = study.runs[:3]
    S.launch(study, tmp_path, runs, "slurm", ["hydra.launcher.partition=gpu"])
    assert submitted["init"]["slurm_max_num_timeout"] == 30
    assert submitted["params"]["slurm_partition"] == "gpu" and submitted["params"]["timeout_min"] == 2880
    assert [job[0] for job in submitted["jobs"]] == [S.run_overrides(run, tmp_path) for run in runs]
    assert f"run_dir={tmp_path / runs[0].name}" in submitted["jobs"][0][0]
    # submitit's requeue signal is one train.py checkpoints on, here and in the jobs (sbatch's --signal).
    assert S.os.environ["SUBMITIT_PREEMPT_SIGNAL"] == "USR1" and submitit.JobEnvironment.USR_SIG == "USR1"


@pytest.mark.usefixtures("keep_signal_handlers")
def test_a_preempted_run_hands_the_signal_back_to_submitit(tmp_path, monkeypatch, tiny_config):
    import train
    from trainer.runtime import PREEMPTED_EXIT_CODE

    calls = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))

    def preempted(cfg):
        signal.signal(signal.SIGUSR1, lambda *a: None)  # train() installs its own handlers
        raise SystemExit(PREEMPTED_EXIT_CODE)

    monkeypatch.setattr(train, "train", preempted)
    with pytest.raises(SystemExit):
        S.run_one(tiny_config(tmp_path))
    assert calls == [signal.SIGUSR1]
    signal.getsignal(signal.SIGUSR1)(0, None)  # the displaced handler is back in place
    assert len(calls) == 2
