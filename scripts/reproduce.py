"""Reproduce a paper table with one command: `python scripts/reproduce.py table1_int4 --scale paper`.

Runs every run of a study (configs/study/<name>.yaml) that has not finished, one after another in
this process (`--launcher local`) or as one SLURM job per run (`--launcher slurm`), then writes the
report. Running it again skips finished runs and resumes interrupted ones. Arguments after the study
are Hydra overrides: `hydra.launcher.*` ones configure the SLURM launcher, the others apply to every
run (e.g. `data.path=/data/c4`). See docs/reproduce.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.report import report  # noqa: E402
from trainer.study import SCALES, LAUNCHERS, StudyError, available_studies, reproduce  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=f"studies: {', '.join(available_studies())}")
    parser.add_argument("study", help="a name in configs/study/ or a path to a study .yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, or hydra.launcher.* settings")
    parser.add_argument("--scale", choices=SCALES, default="tiny")
    parser.add_argument("--launcher", choices=sorted(LAUNCHERS), default="local")
    parser.add_argument("--out", type=Path, help="study directory (default outputs/studies/<study>-<scale>)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, their status and overrides; run nothing")
    parser.add_argument("--retry-diverged", action="store_true", help="run diverged runs again (from their last checkpoint)")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_intermixed_args(argv)
    started = time.perf_counter()
    try:
        study_dir, code = reproduce(args.study, args.scale, args.launcher, args.overrides, args.out,
                                    dry_run=args.dry_run, retry_diverged=args.retry_diverged)
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.dry_run:
        if not args.no_report:
            print(f"report: {report([study_dir])}")
        print(f"study finished in {time.perf_counter() - started:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
