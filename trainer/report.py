"""Reports: a study's table, curves and costs, computed only from what its runs logged.

Every number comes from a run directory's `metrics.jsonl` and config (`config.yaml`, or the newest
`config.step_<N>.yaml` a resume with changed settings wrote); the study file written by
`scripts/reproduce.py` (`study.yaml`) only says which runs to expect and how to lay them out, and
carries the published numbers shown beside ours at paper scale.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from trainer.study import DIVERGED, GROUPS, STUDY_FILE, Run, Study, read_study

FIGURES = ("val_ppl.png", "train_loss.png", "grad_norm.png", "ppl_vs_lr.png", "throughput.png")
REPORT = "report.md"


@dataclass
class RunRecord:
    """One run directory as logged: its config, training rows, validation rows and outcome."""

    name: str
    run_dir: Path
    config: dict[str, Any] | None = None
    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    diverged: str | None = None

    @property
    def max_steps(self) -> int | None:
        return self.config["trainer"]["max_steps"] if self.config else None

    @property
    def last_step(self) -> int:
        return max((row["step"] for row in self.train), default=0)

    @property
    def final_val(self) -> dict[str, Any] | None:
        """The evaluation at max_steps, which only a finished run has."""
        return next((row for row in self.val if row["step"] == self.max_steps), None)

    @property
    def status(self) -> str:
        if self.config is None:
            return "missing"
        if self.final_val is not None:
            return "done"
        return "diverged" if self.diverged is not None else "unfinished"

    def describe_status(self) -> str:
        if self.status == "missing":
            return "missing (no config.yaml)"
        if self.status == "diverged":
            return f"diverged (last logged step {self.last_step}): {self.diverged}"
        if self.status == "unfinished":
            return f"unfinished: step {self.last_step} of {self.max_steps}"
        return "done"

    def setting(self, key: str) -> Any:
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    @property
    def train_time_s(self) -> float | None:
        """Seconds spent in training steps: each logged window's tokens over its tokens/s."""
        total, seen = 0.0, 0
        for row in self.train:
            if row.get("tokens_per_s"):
                total += (row["tokens_seen"] - seen) / row["tokens_per_s"]
            seen = row.get("tokens_seen", seen)
        return total or None

    @property
    def tokens_per_s(self) -> float | None:
        time_s = self.train_time_s
        return self.train[-1]["tokens_seen"] / time_s if time_s else None

    @property
    def wall_s(self) -> float | None:
        """From the start of the first logged window to the last record: includes evaluation,
        checkpoints and, for a resumed run, the time it stood still."""
        if not self.train:
            return None
        first = self.train[0]
        start = first["time"] - (first["tokens_seen"] / first["tokens_per_s"] if first.get("tokens_per_s") else 0.0)
        times = [row["time"] for row in (*self.train, *self.val)]
        return max(times) - min(start, *times)

    def mean(self, key: str) -> float | None:
        values = [row[key] for row in self.train if row.get(key) is not None]
        return statistics.fmean(values) if values else None

    def peak(self, key: str) -> float | None:
        values = [row[key] for row in self.train if row.get(key) is not None]
        return max(values) if values else None


def _newest_config(run_dir: Path) -> Path | None:
    """config.yaml, or the config of the latest resume that changed settings (config.step_<N>.yaml)."""
    resumed = sorted(run_dir.glob("config.step_*.yaml"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
    if resumed:
        return resumed[-1]
    return run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else None


def load_run(run_dir: Path, name: str | None = None) -> RunRecord:
    record = RunRecord(name or run_dir.name, run_dir)
    config = _newest_config(run_dir)
    if config is not None:
        record.config = OmegaConf.to_container(OmegaConf.load(config))
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if "val_loss" in row:
                    rows[("val", row["step"])] = row
                elif "loss" in row and not row.get("skipped_step"):
                    rows[("train", row["step"])] = row
    record.train = sorted((r for (kind, _), r in rows.items() if kind == "train"), key=lambda r: r["step"])
    record.val = sorted((r for (kind, _), r in rows.items() if kind == "val"), key=lambda r: r["step"])
    if (run_dir / DIVERGED).is_file():
        record.diverged = (run_dir / DIVERGED).read_text().strip()
    return record


def config_mismatches(record: RunRecord, run: Run) -> list[str]:
    """Where the run's logged config disagrees with the study's overrides (another run in that directory)."""
    if record.config is None:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, found = OverridesParser.create(), []
    for override in map(parser.parse_override, run.overrides):
        key, expected = override.key_or_group, override.value()
        if override.is_add() or key.startswith("hydra."):
            continue
        if key in (*GROUPS, "data"):
            key = f"{key}.name"
        actual = record.setting(key)
        same = (math.isclose(actual, expected, rel_tol=1e-9)
                if isinstance(actual, (int, float)) and isinstance(expected, (int, float)) else actual == expected)
        if not same:
            found.append(f"{key} is {actual!r}, the study says {expected!r}")
    return found


@dataclass
class Cell:
    """The seeds of one table cell: their final perplexities and how many runs are in each state."""

    ppl: list[float]
    expected: int
    diverged: int

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.ppl) if self.ppl else None

    def text(self) -> str:
        if not self.ppl:
            return "diverged" if self.diverged else "—"
        text = f"{self.mean:.2f}"
        if len(self.ppl) > 1:
            text += f" ± {statistics.stdev(self.ppl):.2f}"
        if len(self.ppl) < self.expected:
            text += f" ({len(self.ppl)}/{self.expected} seeds{f', {self.diverged} diverged' if self.diverged else ''})"
        return text


def cells(study: Study, records: dict[str, RunRecord]) -> dict[tuple[str, str], Cell]:
    table = {}
    for row in study.rows:
        for column in study.columns:
            runs = [records[r.name] for r in study.runs if r.row == row and r.column == column]
            table[row, column] = Cell(
                ppl=[r.final_val["val_ppl"] for r in runs if r.status == "done"], expected=len(runs),
                diverged=sum(r.status == "diverged" for r in runs))
    return table


def study_from_runs(run_dirs: Sequence[Path]) -> Study:
    """A one-column layout for run directories that belong to no study: a row per run."""
    names = [d.name for d in run_dirs]
    if len(set(names)) != len(names):
        names = [str(d) for d in run_dirs]
    runs = [Run(name, name, "final", 0, ()) for name in names]
    return Study(name="runs", scale="", title="Selected runs", rows={n: n for n in names},
                 columns={"final": "final val ppl"}, published={}, runs=runs, slurm=[])


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


RECIPE_KEYS = ("data.name", "data.seq_len", "data.packing", "trainer.global_batch_size", "trainer.max_steps",
               "trainer.warmup_steps", "trainer.lr_schedule", "trainer.min_lr_ratio", "trainer.precision",
               "data.val_tokens")


def recipe_lines(records: Sequence[RunRecord]) -> list[str]:
    """Shared training settings, from the runs' configs; a setting the runs disagree on lists its values."""
    logged = [r for r in records if r.config is not None]
    lines = []
    for key in RECIPE_KEYS:
        values = sorted({json.dumps(r.setting(key)) for r in logged})
        if values:
            lines.append(f"`{key}` {' / '.join(values)}")
    return lines


def write_report(study: Study, records: dict[str, RunRecord], out_dir: Path) -> Path:
    """Write report.md, report.json and the figures into `out_dir`; returns report.md's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = cells(study, records)
    show_published = study.scale == "paper" and bool(study.published)
    expected = [records[run.name] for run in study.runs]
    done = [r for r in expected if r.status == "done"]

    header = ["optimizer" if study.name != "runs" else "run"]
    for label in study.columns.values():
        header += [label, f"{label} (paper)"] if show_published else [label]
    rows = []
    for row_id, row_label in study.rows.items():
        line = [row_label]
        for col_id in study.columns:
            line.append(table[row_id, col_id].text())
            if show_published:
                line.append(_fmt(study.published.get(row_id, {}).get(col_id), ".2f"))
        rows.append(line)

    parts = [f"# {study.title}", ""]
    if study.scale:
        parts.append(f"Study `{study.name}`, scale `{study.scale}`: {len(done)} of {len(expected)} runs finished.")
    parts += ["", "Final validation perplexity (the evaluation at `trainer.max_steps`, from each run's "
              "`metrics.jsonl`; mean ± std over seeds where there are several)"
              + ("; published numbers beside ours." if show_published else "."), "",
              markdown_table(header, rows), ""]
    if study.scale == "tiny":
        parts += ["Tiny scale: a small model on the bundled sample corpus for a few hundred steps. Its "
                  "perplexities are not comparable with the papers'; it exercises the pipeline and shows trends.", ""]
    parts += ["Training settings (from the runs' configs): " + "; ".join(recipe_lines(expected)) + ".", ""]

    problems = [f"- `{r.name}`: {r.describe_status()}" for r in expected if r.status != "done"]
    for run in study.runs:
        problems += [f"- `{run.name}`: config mismatch: {m}" for m in config_mismatches(records[run.name], run)]
    parts += ["## Missing or unfinished runs", "", *(problems or ["None: every run finished."]), ""]

    parts += ["## Runs", "", markdown_table(
        ["run", "status", "optimizer", "quant", "model", "lr", "clip", "seed", "steps", "final val ppl", "final loss",
         "tokens/s", "MFU", "peak GiB", "train time", "wall clock"],
        [[f"`{r.name}`", r.status, str(r.setting("optimizer.name")), str(r.setting("quant.name")),
          str(r.setting("model.name")), _fmt(r.setting("optimizer.lr"), ".3g"),
          _fmt(r.setting("trainer.grad_clip") or None, "g"), str(r.setting("trainer.seed")),
          f"{r.last_step}/{r.max_steps}", _fmt(r.final_val["val_ppl"] if r.final_val else None, ".2f"),
          _fmt(r.train[-1]["loss"] if r.train else None, ".4f"), _fmt(r.tokens_per_s, ",.0f"),
          _fmt(r.mean("mfu"), ".1%"), _fmt(r.peak("peak_mem_gib"), ".1f"),
          _duration(r.train_time_s), _duration(r.wall_s)] for r in expected]), ""]
    parts += ["tokens/s counts target tokens over the time spent in training steps (train time); wall clock runs "
              "from the first logged window to the last record, evaluation and checkpoints included (and, for a "
              "resumed run, the time it stood still).", ""]

    draw_figures(study, records, out_dir)
    parts += ["## Figures", "",
              "![validation perplexity](val_ppl.png)", "",
              "![training loss](train_loss.png)", "",
              "Gradient norm before clipping, the largest of each logging window "
              "(`trainer.log_every`; runs that logged no window maximum show the window's last step):", "", "![gradient norm](grad_norm.png)", "",
              "![final perplexity against learning rate](ppl_vs_lr.png)", "",
              "![throughput and wall clock](throughput.png)", ""]
    report = out_dir / REPORT
    report.write_text("\n".join(parts))
    summary = {
        "study": study.name, "scale": study.scale, "title": study.title,
        "table": {row: {col: {"ppl": table[row, col].ppl, "mean": table[row, col].mean,
                              "published": study.published.get(row, {}).get(col)}
                        for col in study.columns} for row in study.rows},
        "runs": {r.name: {"status": r.status, "final_val_ppl": r.final_val["val_ppl"] if r.final_val else None,
                          "last_step": r.last_step, "tokens_per_s": r.tokens_per_s, "train_time_s": r.train_time_s,
                          "wall_s": r.wall_s} for r in expected},
    }
    (out_dir / "report.json").write_text(json.dumps(summary, indent=1))
    return report


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def report(paths: Sequence[Path], out_dir: Path | None = None) -> Path:
    """A study directory (holding study.yaml) or any run directories -> report.md (default: beside them)."""
    if len(paths) == 1 and (paths[0] / STUDY_FILE).is_file():
        study = read_study(paths[0])
        records = {run.name: load_run(paths[0] / run.name) for run in study.runs}
        return write_report(study, records, out_dir or paths[0])
    study = study_from_runs(paths)
    records = {run.name: load_run(path, run.name) for run, path in zip(study.runs, paths)}
    return write_report(study, records, out_dir or Path("report"))


# Figures: one panel per study column, one colour per row, the same colours in every figure.

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(plt, count: int, width: float = 4.6, height: float = 3.4):
    ncols = min(count, 4)
    nrows = math.ceil(count / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + 0.9), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _colours(study: Study) -> dict[str, Any]:
    plt = _pyplot()
    palette = plt.get_cmap("tab10" if len(study.rows) <= 10 else "tab20")
    return {row: palette(i % palette.N) for i, row in enumerate(study.rows)}


def _plain_log_ticks(ax, axis: str = "y") -> None:
    """Log-scale tick labels as plain numbers (800, 1000), minor ones too when the range is under a decade."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ratio = high / low if low > 0 else math.inf

    def minor(value: float, _: int) -> str:
        digit = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
        return f"{value:g}" if ratio < 10 or (ratio < 100 and digit in (2, 5)) else ""

    target.set_minor_formatter(FuncFormatter(minor) if ratio < 100 else NullFormatter())


def _finish(fig, path: Path, title: str, handles: dict[str, Any]) -> None:
    ncol = max(1, min(len(handles), 4, int(fig.get_figwidth() / 2.3)))  # legend entries that fit across
    rows = math.ceil(len(handles) / ncol) if handles else 0
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, min(0.3, 0.05 * rows + 0.02 * bool(rows)) if rows else 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def _curves(study: Study, records: dict[str, RunRecord], path: Path, title: str, ylabel: str,
            series, log_y: bool, late_range: bool = False) -> None:
    """One line per run (row colour; seeds share it), one panel per column; x marks a divergence."""
    plt = _pyplot()
    colours = _colours(study)
    fig, axes = _panels(plt, len(study.columns))
    handles: dict[str, Any] = {}
    for ax, (col_id, col_label) in zip(axes, study.columns.items()):
        late: list[float] = []
        for run in (r for r in study.runs if r.column == col_id):
            record = records[run.name]
            points = series(record)
            if not points:
                continue
            xs, ys = zip(*points)
            (line,) = ax.plot(xs, ys, color=colours[run.row], lw=1.3, alpha=0.9)
            handles.setdefault(study.rows[run.row], line)
            if record.status == "diverged":
                ax.plot(xs[-1], ys[-1], "x", color=colours[run.row], ms=9, mew=2)
            horizon = 0.1 * (record.max_steps or max(xs))
            late += [y for x, y in points if x >= horizon]
        ax.set_title(col_label, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        if late_range and late:
            low, high = min(late), max(late)
            pad = 0.05 * (high - low or abs(high) or 1.0)
            ax.set_ylim(low - pad, high + pad)
        if log_y and ax.lines:
            _plain_log_ticks(ax)
        ax.grid(alpha=0.3, which="both")
        if not ax.lines:
            ax.text(0.5, 0.5, "no runs logged", ha="center", va="center", transform=ax.transAxes)
    _finish(fig, path, title, handles)


def _lr_figure(study: Study, records: dict[str, RunRecord], path: Path) -> None:
    """Final perplexity against learning rate, a line per row (seed means), a panel per quant x model."""
    plt = _pyplot()
    colours = _colours(study)
    groups: dict[str, list[Run]] = {}
    for run in study.runs:
        record = records[run.name]
        if record.status in ("done", "diverged"):
            key = f"{record.setting('quant.name')} quant, {record.setting('model.name')}"
            groups.setdefault(key, []).append(run)
    fig, axes = _panels(plt, max(len(groups), 1), width=6.0)
    handles: dict[str, Any] = {}
    for ax, (key, runs) in zip(axes, sorted(groups.items())):
        diverged: list[tuple[float, str]] = []
        for row in study.rows:
            by_lr: dict[float, list[float]] = {}
            for run in (r for r in runs if r.row == row):
                record = records[run.name]
                lr = float(record.setting("optimizer.lr"))
                if record.status == "done":
                    by_lr.setdefault(lr, []).append(record.final_val["val_ppl"])
                else:
                    diverged.append((lr, row))
            if by_lr:
                lrs = sorted(by_lr)
                (line,) = ax.plot(lrs, [statistics.fmean(by_lr[lr]) for lr in lrs], "o-", color=colours[row])
                handles.setdefault(study.rows[row], line)
        ax.set_xscale("log")
        ax.set_yscale("log")
        if diverged:
            top = ax.get_ylim()[1] if ax.lines else 1.0
            for lr, row in diverged:
                ax.plot(lr, top, "x", color=colours[row], ms=10, mew=2, clip_on=False)
            ax.text(0.02, 0.98, "x: diverged", transform=ax.transAxes, va="top", fontsize=8)
        if ax.lines:
            _plain_log_ticks(ax, "y")
            _plain_log_ticks(ax, "x")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final validation perplexity")
        ax.grid(alpha=0.3, which="both")
    if not groups:
        axes[0].text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=axes[0].transAxes)
    _finish(fig, path, "Final validation perplexity against learning rate", handles)


def _throughput_figure(study: Study, records: dict[str, RunRecord], path: Path) -> None:
    plt = _pyplot()
    colours = _colours(study)
    runs = list(study.runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.28 * len(runs)), sharey=True)
    names = [run.name for run in runs]
    ys = range(len(runs))
    bar_colours = [colours[run.row] for run in runs]
    left.barh(ys, [records[n].tokens_per_s or 0 for n in names], color=bar_colours)
    right.barh(ys, [(records[n].wall_s or 0) / 60 for n in names], color=bar_colours)
    left.set_yticks(list(ys), names, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("tokens/s (training steps)")
    right.set_xlabel("wall clock (minutes)")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("Throughput and wall clock per run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_figures(study: Study, records: dict[str, RunRecord], out_dir: Path) -> None:
    _curves(study, records, out_dir / "val_ppl.png", "Validation perplexity", "validation perplexity",
            lambda r: [(row["step"], row["val_ppl"]) for row in r.val], log_y=True)
    _curves(study, records, out_dir / "train_loss.png", "Training loss (mean over each logging window)", "loss",
            lambda r: [(row["step"], row["loss"]) for row in r.train if row.get("loss") is not None],
            log_y=False, late_range=True)
    _curves(study, records, out_dir / "grad_norm.png", "Gradient norm before clipping", "gradient norm",
            lambda r: [(row["step"], row.get("grad_norm_max", row["grad_norm"])) for row in r.train
                       if row.get("grad_norm")], log_y=True)
    _lr_figure(study, records, out_dir / "ppl_vs_lr.png")
    _throughput_figure(study, records, out_dir / "throughput.png")
