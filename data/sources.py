"""Where documents come from: local C4 shards (`*.json.gz`) or the Hugging Face Hub, streamed.

Both sources expose the same small interface, a list of shards and the records of one shard from
a given line on, so that shuffling and resume positions are defined once, in `data.stream`. Local
shards are read with `gzip` rather than `datasets`' json builder: skipping lines to resume is then a
raw read with no JSON parsing, and a corrupt line can be skipped and counted instead of failing.
"""
from __future__ import annotations

import gzip
import itertools
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from data.config import REPO_ROOT, TRAIN_SHARD_GLOB, VALIDATION_SHARD_GLOB, DataError, resolve_repo_path
from data.hub import hub_unreachable_message, is_connection_error, local_shards_remedy

SPLIT_GLOBS = {"train": TRAIN_SHARD_GLOB, "validation": VALIDATION_SHARD_GLOB}


def parse_record(record: Any) -> Optional[str]:
    """The document text, or None for a record without a string `text`."""
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    return None


class LocalShards:
    """C4-format shards in a local directory, in sorted file order."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.shard_names = [f.name for f in files]

    def records(self, shard: int, start_line: int) -> Iterator[Optional[str]]:
        """Texts of the lines from `start_line` on; None for a line that is not a valid record."""
        path = self.files[shard]
        try:
            with gzip.open(path, "rb") as lines:
                for _ in itertools.islice(lines, start_line):
                    pass
                for line in lines:
                    try:
                        yield parse_record(json.loads(line))
                    except ValueError:
                        yield None
        except (EOFError, OSError, zlib.error) as error:
            raise DataError(f"C4 shard {path} is truncated or not a valid gzip file ({error}); download it again") from error


class HubShards:
    """A split of a hub dataset streamed with `datasets`, one shard per file of the split."""

    def __init__(self, hub_id: str, hub_config: str, split: str):
        import datasets

        what = f"{hub_id} ({hub_config}, {split})"
        try:
            self.dataset = datasets.load_dataset(hub_id, hub_config, split=split, streaming=True)
        except Exception as error:
            if is_connection_error(error):
                raise DataError(hub_unreachable_message(what, local_shards_remedy())) from error
            raise DataError(f"could not open {what} on the Hugging Face Hub: {error}") from error
        self.shard_names = [f"{hub_id}/{hub_config}/{split}#{i}" for i in range(self.dataset.num_shards)]

    def records(self, shard: int, start_line: int) -> Iterator[Optional[str]]:
        one_file = self.dataset.shard(num_shards=len(self.shard_names), index=shard, contiguous=True)
        for record in itertools.islice(one_file, start_line, None):
            yield parse_record(record)


class ShardSubset:
    """Some shards of a source, numbered from 0: the shards of one lane (see data.stream)."""

    def __init__(self, source: LocalShards | HubShards, indices: range):
        self.source, self.indices = source, indices
        self.shard_names = [source.shard_names[i] for i in indices]

    def records(self, shard: int, start_line: int) -> Iterator[Optional[str]]:
        return self.source.records(self.indices[shard], start_line)


def open_source(cfg: Any, split: str) -> LocalShards | HubShards:
    """Local shards when `cfg.path` is set, else the hub; a clear DataError for a bad path."""
    if cfg.path is None:
        return HubShards(cfg.hub_id, cfg.hub_config, split)
    directory = resolve_repo_path(str(cfg.path))
    pattern = SPLIT_GLOBS[split]
    hint = f"{local_shards_remedy()}, set data.path=null to stream the hub, or use data=sample"
    if not directory.is_dir():
        raise DataError(
            f"data directory {directory} does not exist (data.path={cfg.path!r}; relative paths are "
            f"resolved against {REPO_ROOT}): {hint}"
        )
    files = sorted(directory.glob(pattern)) or sorted(directory.glob(Path(pattern).name))
    if not files:
        raise DataError(f"data directory {directory} has no {split} shards matching {pattern}: {hint}")
    return LocalShards(files)
