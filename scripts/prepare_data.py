"""Tokenize C4-format text once into memory-mapped token files, then train with `data=tokens`.

    python scripts/prepare_data.py data=c4 data.path=/data/c4 data.tokenizer=/data/t5-base/spiece.model output=/data/c4-tokens
    python scripts/prepare_data.py data=c4 train_shards=24 output=/data/c4-tokens    # streams allenai/c4 from the hub
    python scripts/prepare_data.py data=sample output=/tmp/sample-tokens --workers 2
    python train.py data=tokens data.path=/data/c4-tokens

Composed by Hydra like train.py (configs/prepare_data.yaml; `--workers N` is accepted for
`workers=N`). Shards are tokenized in parallel worker processes; an interrupted run resumes when
started again with the same command. See data/prepare.py for the format and docs/data.md for figures.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from data.config import resolve_repo_path  # noqa: E402
from data.prepare import default_workers, disk_bytes, prepare  # noqa: E402
from data.prepare import register_configs as register_prepare_configs  # noqa: E402

data.register_configs(ConfigStore.instance())
register_prepare_configs(ConfigStore.instance())


def hydra_arguments(argv: list[str]) -> list[str]:
    """`--workers N` and `--workers=N` as Hydra's `workers=N`."""
    arguments, rest = [], iter(argv)
    for argument in rest:
        if argument == "--workers":
            arguments.append(f"workers={next(rest, '')}")
        elif argument.startswith("--workers="):
            arguments.append(argument[2:])
        else:
            arguments.append(argument)
    return arguments


@hydra.main(config_path="../configs", config_name="prepare_data", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "output"):
        print("error: set output=<directory> for the token files", file=sys.stderr)
        sys.exit(2)
    output = resolve_repo_path(cfg.output)
    workers = default_workers() if cfg.workers is None else cfg.workers
    try:
        result = prepare(OmegaConf.to_object(cfg.data), output, workers=workers,
                         shards={"train": cfg.train_shards, "validation": cfg.validation_shards})
    except data.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    run = result["run"]
    for split in ("train", "validation"):
        totals = result["splits"][split]
        print(f"{split}: {totals['documents']:,} documents, {totals['tokens']:,} tokens in {len(totals['shards'])} "
              f"shard(s), {totals['skipped_lines']} corrupt line(s) skipped")
    if run["shards"]:
        rate = run["tokens"] / run["seconds"]
        print(f"tokenized {run['tokens']:,} tokens of {run['shards']} shard(s) in {run['seconds']:.1f} s with "
              f"{run['workers']} process(es): {rate:,.0f} tokens/s ({rate / run['workers']:,.0f} per process)")
    else:
        print("every shard was already prepared")
    print(f"{output}: {disk_bytes(output):,} bytes, {result['dtype']} | train with: "
          f"python train.py data=tokens data.path={output}")


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *hydra_arguments(sys.argv[1:])]
    main()
