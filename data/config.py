"""Typed schema of the `data` config group and the path rules shared by the data package."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore

REPO_ROOT = Path(__file__).resolve().parent.parent
PREPARED_TOKENIZER = "spiece.model"
TRAIN_SHARD_GLOB = "en/c4-train.*.json.gz"
VALIDATION_SHARD_GLOB = "en/c4-validation.*.json.gz"


class DataError(ValueError):
    """A data or tokenizer problem the user can fix; the message says how."""


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized and how rows are cut.

    `path` and a local `tokenizer` may be relative: they are resolved against the repository root
    (the directory holding the `data` package), not the working directory, so they mean the same
    thing whatever directory Hydra or a launcher starts in.

    `format` is `text` (C4-format JSON-lines shards, tokenized while training) or `tokens` (a
    directory written by scripts/prepare_data.py; `tokenizer: null` then means the copy stored in it).
    `lanes`/`lane_rows` spread the text stream over lanes of shards so that each rank reads only
    its share (see data.stream).
    """

    name: str = "sample"
    format: str = "text"
    path: Optional[str] = "data/sample"
    hub_id: str = "allenai/c4"
    hub_config: str = "en"
    tokenizer: Optional[str] = "data/sample/tokenizer"
    seq_len: int = 256
    packing: bool = True
    shuffle: bool = True
    shuffle_buffer: int = 1000
    seed: int = 42
    num_workers: int = 0
    val_tokens: int = 100_000
    lanes: int = 1
    lane_rows: int = 8


def register_configs(cs: ConfigStore) -> None:
    cs.store(group="data", name="data_schema", node=DataConfig)


def resolve_repo_path(value: str) -> Path:
    """An absolute path as is; a relative one against the repository root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def prepared_directory(cfg) -> Path:
    """The directory of prepared token files that `data.path` names (`data=tokens`)."""
    if cfg.path is None:
        raise DataError("data=tokens needs data.path=<directory written by `python scripts/prepare_data.py ... output=DIR`>")
    return resolve_repo_path(str(cfg.path))
