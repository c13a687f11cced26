"""Studies: a paper's table written as data, expanded into train.py runs and launched through Hydra.

A study file (`configs/study/<name>.yaml`, read over `configs/study/_base.yaml`) names a grid of rows
(usually optimizers) x columns (formats, model sizes or learning rates) x seeds, the recipe of each
scale (`tiny`: minutes on a CPU; `paper`: the papers' runs) and the published numbers. Every cell
becomes one run per seed in `<study dir>/<row>-<column>-s<seed>`: the name depends only on the cell,
so running a study again skips the runs that finished and resumes the others (train.py resumes from
its run directory by itself).

Runs go through Hydra's launcher plugins, as `--multirun` would send them: `hydra/launcher=basic`
runs them one after another in this process, `hydra/launcher=submitit_slurm` submits one SLURM job
per run (hydra-submitit-launcher) that requeues itself when pre-empted.
"""
from __future__ import annotations

import os
import re
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from trainer.checkpoint import MANIFEST
from trainer.runtime import PREEMPTED_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
STUDIES = CONFIGS / "study"
SCALES = ("tiny", "paper")
GROUPS = ("optimizer", "quant", "model")
"""The Hydra groups a study, a row, a column or a cell may choose (by preset name)."""
ENTRY_KEYS = {"label", *GROUPS, "lr", "overrides"}
STUDY_KEYS = {"title", "seeds", "recipe", "overrides", "preset_overrides", "slurm", "rows", "columns", "cells",
              "published", "scales", *GROUPS, "lr"}
STUDY_FILE = "study.yaml"
"""Written into the study directory: the runs this study expects, what the report lays out."""
DIVERGED = "DIVERGED"
"""Written into a run directory that stopped on a non-finite loss: a result, not retried by default."""
LAUNCHERS = {"local": "basic", "slurm": "submitit_slurm"}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StudyError(ValueError):
    """A study file that cannot be expanded; the message names the file and the key."""


@dataclass(frozen=True)
class Run:
    name: str
    row: str
    column: str
    seed: int
    overrides: tuple[str, ...]
    """Hydra overrides of train.py, without the run directory (the study directory decides it)."""


@dataclass
class Study:
    name: str
    scale: str
    title: str
    rows: dict[str, str]
    """Row id -> label, in the file's order; columns likewise."""
    columns: dict[str, str]
    published: dict[str, dict[str, float]]
    runs: list[Run]
    slurm: list[str]
    """Hydra overrides of the submitit launcher (hydra.launcher.*) for --launcher slurm."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["runs"] = [{**asdict(run), "overrides": list(run.overrides)} for run in self.runs]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Study:
        runs = [Run(**{**run, "overrides": tuple(run["overrides"])}) for run in data["runs"]]
        return cls(**{**data, "runs": runs})


def available_studies() -> list[str]:
    return sorted(p.stem for p in STUDIES.glob("*.yaml") if not p.stem.startswith("_"))


def presets(group: str) -> set[str]:
    return {p.stem for p in (CONFIGS / group).glob("*.yaml")}


def override_key(override: str) -> str:
    """`+experiment=x` -> `experiment`, `optimizer.lr=1e-3` -> `optimizer.lr`."""
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(*lists: Sequence[str]) -> list[str]:
    """Concatenate, a later value of a key replacing an earlier one in place (Hydra's last-wins, shown once)."""
    merged: dict[str, str] = {}
    for overrides in lists:
        for override in overrides:
            merged[override_key(override)] = override
    return list(merged.values())


def study_path(name: str) -> Path:
    path = Path(name) if name.endswith(".yaml") else STUDIES / f"{name}.yaml"
    if not path.is_file():
        raise StudyError(f"no study {name!r} ({path}); studies: {', '.join(available_studies())}")
    return path


def _layers(path: Path, scale: str) -> list[dict[str, Any]]:
    """The study's layers, least specific first: base, study, base's scale section, study's scale section."""
    layers, scaled_layers = [], []
    for source in (STUDIES / "_base.yaml", path):
        data = OmegaConf.to_container(OmegaConf.load(source), resolve=True) or {}
        unknown = set(data) - STUDY_KEYS
        if unknown:
            raise StudyError(f"{source}: unknown key(s) {sorted(unknown)}; known: {sorted(STUDY_KEYS)}")
        scales = data.pop("scales", None) or {}
        if set(scales) - set(SCALES):
            raise StudyError(f"{source}: scales must be among {SCALES}, got {sorted(scales)}")
        scaled = scales.get(scale) or {}
        if set(scaled) - STUDY_KEYS or "scales" in scaled:
            raise StudyError(f"{source} scales.{scale}: unknown key(s) {sorted(set(scaled) - STUDY_KEYS)}")
        layers.append(data)
        scaled_layers.append(scaled)
    return layers + scaled_layers


def _spec(path: Path, scale: str) -> dict[str, Any]:
    """Merge the layers: `overrides` accumulate, `preset_overrides` merge per preset, others replace."""
    spec: dict[str, Any] = {"overrides": [], "preset_overrides": {}, "cells": {}, "published": {}, "slurm": [],
                            "recipe": [], "seeds": [0]}
    for layer in _layers(path, scale):
        for key, value in layer.items():
            if key == "overrides":
                spec[key] = [*spec[key], *(value or [])]
            elif key == "preset_overrides":
                spec[key] = {**spec[key], **(value or {})}
            else:
                spec[key] = value
    return spec


def _check_entry(where: str, entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict) or "label" not in entry:
        raise StudyError(f"{where}: needs a mapping with a label")
    unknown = set(entry) - ENTRY_KEYS
    if unknown:
        raise StudyError(f"{where}: unknown key(s) {sorted(unknown)}; an entry may set {sorted(ENTRY_KEYS)}")
    return entry


def _pick_lr(levels: Sequence[dict[str, Any]], model: str, where: str) -> float | None:
    """The most specific learning rate: a number, or a mapping model -> number that names this model."""
    for level in levels:
        value = level.get("lr")
        if isinstance(value, dict):
            value = value.get(model)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise StudyError(f"{where}: lr must be a number or a mapping model -> number, got {value!r}")
        return float(value)
    return None


def load_study(name: str, scale: str, extra_overrides: Sequence[str] = ()) -> Study:
    """Expand a study file at `scale` into its runs; `extra_overrides` go last on every run."""
    if scale not in SCALES:
        raise StudyError(f"scale {scale!r}: choose one of {', '.join(SCALES)}")
    path = study_path(name)
    spec = _spec(path, scale)
    where = f"{path} ({scale} scale)"
    rows = {key: _check_entry(f"{where} rows.{key}", value) for key, value in (spec.get("rows") or {}).items()}
    columns = {key: _check_entry(f"{where} columns.{key}", value)
               for key, value in (spec.get("columns") or {}).items()}
    if not rows or not columns:
        raise StudyError(f"{where}: needs at least one row and one column")
    for key in (*rows, *columns):
        if not _ID.match(str(key)):
            raise StudyError(f"{where}: id {key!r} must match {_ID.pattern} (it names run directories)")
    cells = spec["cells"] or {}
    for key, cell in cells.items():
        row, _, column = str(key).partition("/")
        if row not in rows or column not in columns:
            raise StudyError(f"{where}: cells.{key} must be <row>/<column> of this study")
        if set(cell) - (ENTRY_KEYS - {"label"}):
            raise StudyError(f"{where}: cells.{key}: unknown key(s) {sorted(set(cell) - ENTRY_KEYS)}")
    published = (spec["published"] or {}) if scale == "paper" else {}  # numbers of the papers' runs only
    for row, values in published.items():
        if row not in rows or set(values or {}) - set(columns):
            raise StudyError(f"{where}: published.{row} must name rows and columns of this study")
    seeds = spec["seeds"]
    if not seeds or not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds):
        raise StudyError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")

    runs = []
    for row_id, row in rows.items():
        for col_id, column in columns.items():
            cell = cells.get(f"{row_id}/{col_id}") or {}
            here = f"{where} cell {row_id}/{col_id}"
            clash = ({k for k in (*GROUPS, "lr") if k in row and k in column}
                     | {override_key(o) for o in row.get("overrides") or []}
                     & {override_key(o) for o in column.get("overrides") or []})
            if clash:
                raise StudyError(f"{here}: row and column both set {sorted(clash)}; set it in one place or in cells")
            levels = (cell, row, column, spec)
            chosen = {}
            for group in GROUPS:
                value = next((level[group] for level in levels if level.get(group) is not None), None)
                if value not in presets(group):
                    raise StudyError(f"{here}: {group}={value!r} is not one of configs/{group}/*.yaml: "
                                     f"{', '.join(sorted(presets(group)))}")
                chosen[group] = value
            lr = _pick_lr(levels, chosen["model"], here)
            for seed in seeds:
                overrides = merge_overrides(
                    spec["recipe"], spec["overrides"], [f"{g}={chosen[g]}" for g in GROUPS],
                    spec["preset_overrides"].get(chosen["optimizer"]) or [],
                    [f"optimizer.lr={lr!r}"] if lr is not None else [],
                    column.get("overrides") or [], row.get("overrides") or [], cell.get("overrides") or [],
                    [f"trainer.seed={seed}"], extra_overrides,
                )
                runs.append(Run(f"{row_id}-{col_id}-s{seed}", row_id, col_id, seed, tuple(overrides)))
    return Study(
        name=path.stem, scale=scale, title=spec.get("title") or path.stem,
        rows={k: str(v["label"]) for k, v in rows.items()}, columns={k: str(v["label"]) for k, v in columns.items()},
        published={row: {col: float(v) for col, v in (values or {}).items()} for row, values in published.items()},
        runs=runs, slurm=list(spec["slurm"]),
    )


def save_study(study: Study, study_dir: Path) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(study.to_dict()), study_dir / STUDY_FILE)


def read_study(study_dir: Path) -> Study:
    return Study.from_dict(OmegaConf.to_container(OmegaConf.load(study_dir / STUDY_FILE)))


def run_overrides(run: Run, study_dir: Path) -> list[str]:
    """What one job gets: the run's overrides, its directory (also Hydra's job dir) and its name."""
    run_dir = (study_dir / run.name).absolute()
    return [*run.overrides, f"run_dir={run_dir}", f"logging.run_name={run.name}", f"hydra.sweep.subdir={run.name}"]


def compose_runs(runs: Sequence[Run], study_dir: Path) -> list[DictConfig]:
    """The runs' configs as train.py would compose them (a typo in a study fails here, before any run)."""
    from hydra import compose, initialize_config_dir

    from trainer.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return [compose(config_name="config", overrides=[o for o in run_overrides(run, study_dir)
                                                         if not o.startswith("hydra.")]) for run in runs]


def run_status(run_dir: Path, max_steps: int) -> str:
    """done (a checkpoint at max_steps), diverged, partial (resumes from a checkpoint) or new."""
    checkpoints = run_dir / "checkpoints"
    if (checkpoints / f"step_{max_steps:08d}" / MANIFEST).is_file():
        return "done"
    if (run_dir / DIVERGED).is_file():
        return "diverged"
    if any(checkpoints.glob(f"step_*/{MANIFEST}")):
        return "partial"
    return "new"


def plan(study: Study, study_dir: Path) -> list[tuple[Run, str]]:
    """Every run with its status; composing each one checks the whole study before anything starts."""
    configs = compose_runs(study.runs, study_dir)
    return [(run, run_status(study_dir / run.name, cfg.trainer.max_steps)) for run, cfg in zip(study.runs, configs)]


def launcher_config(launcher: str, study: Study, study_dir: Path, hydra_overrides: Sequence[str] = ()) -> DictConfig:
    """The multirun config a launcher plugin is set up with (hydra.launcher.*, hydra.sweep.dir)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    if launcher not in LAUNCHERS:
        raise StudyError(f"--launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    overrides = [f"hydra/launcher={LAUNCHERS[launcher]}", f"hydra.sweep.dir={study_dir.absolute()}",
                 *(study.slurm if launcher == "slurm" else []), *hydra_overrides]
    loader = GlobalHydra.instance().config_loader()
    return loader.load_configuration(config_name="config", overrides=list(overrides), run_mode=RunMode.MULTIRUN)


def launch(study: Study, study_dir: Path, runs: Sequence[Run], launcher: str = "local",
           hydra_overrides: Sequence[str] = ()) -> list[Any]:
    """Send `runs` through the launcher plugin as one multirun batch; returns Hydra's JobReturns."""
    from hydra import initialize_config_dir
    from hydra._internal.callbacks import Callbacks  # what Hydra's own multirun builds (hydra-core pinned <1.4)
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext

    from trainer.config import register_configs

    register_configs()
    if launcher == "slurm":
        # submitit's pre-emption signal must be one train.py handles (USR1): train.py checkpoints, then
        # run_one hands the signal back to submitit, which requeues. The jobs read the variable (sbatch
        # passes the environment on); this process may have imported submitit before it was set.
        os.environ["SUBMITIT_PREEMPT_SIGNAL"] = "USR1"
        import submitit

        submitit.JobEnvironment.USR_SIG = "USR1"
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3", job_name=f"{study.name}-{study.scale}"):
        config = launcher_config(launcher, study, study_dir, hydra_overrides)
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=Callbacks(config))
        plugin = Plugins.instance().instantiate_launcher(hydra_context=context, task_function=run_one,
                                                         config=config)
        return list(plugin.launch([run_overrides(run, study_dir) for run in runs], initial_job_idx=0))


def _train_module():
    """train.py lives at the repository root, outside the installed packages."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import train

    return train


def hand_back_preemption(displaced: dict[int, Any]) -> None:
    """train.py saved and exited on a pre-emption signal that submitit's handler was waiting for: call
    that handler now (it requeues the job and exits); outside a SLURM job there is none to call."""
    handler = displaced.get(signal.SIGUSR1)
    if callable(handler):
        handler(signal.SIGUSR1, None)


def run_one(cfg: DictConfig) -> dict[str, Any]:
    """Hydra's task function for one study run: train, and turn the outcome into a status.

    A non-finite loss is a result (`DIVERGED` in the run directory, not retried); the project's
    other errors are reported and the next run goes on; a pre-emption exits for a requeue.
    """
    from trainer.step import NonFiniteLossError

    train = _train_module()
    run_dir, name = Path(cfg.run_dir), cfg.logging.run_name
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export()  # one task per GPU: accelerate reads it
    main_process = int(os.environ.get("RANK", "0")) == 0
    displaced = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    print(f"=== study run {name} -> {run_dir}", flush=True)
    try:
        results = train.train(cfg)
    except NonFiniteLossError as error:
        if main_process:
            (run_dir / DIVERGED).write_text(f"{error}\n")
        print(f"run {name} diverged: {error}", file=sys.stderr, flush=True)
        return {"name": name, "status": "diverged", "error": str(error)}
    except train.USER_ERRORS as error:
        print(f"error: run {name}: {error}", file=sys.stderr, flush=True)
        return {"name": name, "status": "error", "error": str(error)}
    except SystemExit as stop:
        if stop.code == PREEMPTED_EXIT_CODE:
            hand_back_preemption(displaced)
        raise
    finally:
        for sig, handler in displaced.items():
            signal.signal(sig, handler)
    return {"name": name, "status": "done", **results}


def latest_checkpoint_step(run_dir: Path) -> int | None:
    steps = [int(p.parent.name.split("_")[1]) for p in (run_dir / "checkpoints").glob(f"step_*/{MANIFEST}")]
    return max(steps, default=None)


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the runs' overrides, the launcher's `hydra.*` ones)."""
    hydra = [o for o in overrides if override_key(o).startswith("hydra.") or o.startswith("hydra/")]
    return [o for o in overrides if o not in hydra], hydra


def reproduce(name: str, scale: str = "tiny", launcher: str = "local", overrides: Sequence[str] = (),
              out: Path | None = None, dry_run: bool = False, retry_diverged: bool = False) -> tuple[Path, int]:
    """Run what a study still lacks; returns (study directory, exit code: 0 when every run finished or
    diverged). Finished runs are skipped, interrupted ones resume, diverged ones stay unless retried."""
    run_extra, hydra_extra = split_overrides(overrides)
    study = load_study(name, scale, run_extra)
    study_dir = (out or Path("outputs") / "studies" / f"{study.name}-{scale}").absolute()
    planned = plan(study, study_dir)
    pending = [run for run, status in planned if status in ("new", "partial") or (status == "diverged" and retry_diverged)]
    print(f"study {study.name} ({scale}): {len(study.runs)} runs in {study_dir}; {len(pending)} to run")
    for run, status in planned:
        note = {"done": "finished, skipped", "diverged": "diverged" + (", retried" if retry_diverged else ", skipped"),
                "partial": f"resumes from step {latest_checkpoint_step(study_dir / run.name)}", "new": "new"}[status]
        print(f"  {run.name}: {note}" + (f"\n    {' '.join(run.overrides)}" if dry_run else ""))
    if dry_run:
        return study_dir, 0
    save_study(study, study_dir)
    if not pending:
        return study_dir, 0
    for run in pending:
        (study_dir / run.name / DIVERGED).unlink(missing_ok=True)
    failed = []
    for run, job in zip(pending, launch(study, study_dir, pending, launcher, hydra_extra)):
        outcome = job._return_value  # JobReturn.return_value re-raises a failed job's exception
        if isinstance(outcome, BaseException):
            failed.append(f"{run.name}: {type(outcome).__name__}: {outcome}")
        elif outcome["status"] == "error":
            failed.append(f"{run.name}: {outcome['error']}")
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return study_dir, 1 if failed else 0
