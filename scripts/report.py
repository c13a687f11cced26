"""Write report.md and its figures for a study directory or any run directories.

    python scripts/report.py outputs/studies/lr_sensitivity-tiny
    python scripts/report.py outputs/run_a outputs/run_b --out reports/ab

Numbers come only from the runs' metrics.jsonl and config.yaml; a study directory's study.yaml says
which runs to expect (missing and unfinished ones are listed) and holds the published numbers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.report import report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a study directory, or run directories")
    parser.add_argument("--out", type=Path, help="where report.md goes (default: the study directory, or ./report)")
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not p.is_dir()]
    if missing:
        print(f"error: not a directory: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    print(report(args.paths, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
