"""Tokenize C4-format shards once into memory-mapped token files for `data=tokens`, in parallel and resumably.

The output directory (format version 1, read by data.tokens):
  <split>/<i:05d>.bin   shard i of the split (train, validation): the ids of its valid documents in
                        file order, each followed by EOS (Tokenizer.encode), raw little-endian uint16,
                        or uint32 when the vocabulary has more than 65,536 ids
  <split>/<i:05d>.json  the shard's record: source name and size, tokenizer sha256, dtype, documents,
                        tokens, skipped corrupt lines
  spiece.model          a copy of the tokenizer
  manifest.json         written last: format version, tokenizer, dtype, and per split the totals and shards
One worker process tokenizes one shard at a time into a temporary file, which is fsync'ed and renamed
into place, then its record likewise. A rerun skips every shard whose record matches its source, its
tokenizer and its file, so an interrupted preparation resumes; the manifest is removed when a run
starts and written when all shards are done, so a directory without it is never trained on.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from data.config import PREPARED_TOKENIZER, DataError, resolve_repo_path
from data.sources import LocalShards, open_source
from data.stream import _chunks
from data.tokenizer import Tokenizer, load_tokenizer
from data.tokens import FORMAT_VERSION, MANIFEST, SPLITS, token_dtype

ENCODE_CHUNK_DOCS = 1024


@dataclass
class PrepareConfig:
    """scripts/prepare_data.py's settings: the `data` group says what to read, `output` where to write."""

    data: Any = MISSING
    output: str = MISSING
    workers: Optional[int] = None  # worker processes; None: every CPU this process may use
    train_shards: Optional[int] = None  # the first N train shards only (the hub has 1024)
    validation_shards: Optional[int] = None


def register_configs(cs: ConfigStore) -> None:
    cs.store(name="prepare_schema", node=PrepareConfig)


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


def write_atomically(path: Path, content: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    identity: dict[str, Any]  # what the finished record must match: source, its size, tokenizer, dtype

    @property
    def key(self) -> tuple[str, int]:
        return self.split, self.index

    @property
    def file(self) -> str:
        return f"{self.split}/{self.index:05d}.bin"

    @property
    def record(self) -> str:
        return f"{self.split}/{self.index:05d}.json"


def finished_record(output: Path, task: ShardTask) -> Optional[dict[str, Any]]:
    """The shard's record if a previous run finished it for the same source and tokenizer, else None."""
    try:
        record = json.loads((output / task.record).read_text())
        size = (output / task.file).stat().st_size
    except (OSError, ValueError):
        return None
    if {key: record.get(key) for key in task.identity} != task.identity:
        return None
    return record if size == record["tokens"] * token_dtype(record["dtype"]).itemsize else None


_worker: dict[str, Any] = {}


def _start_worker(cfg: Any, model_proto: bytes, tokenizer_source: str) -> None:
    _worker.update(cfg=cfg, tokenizer=Tokenizer(model_proto, tokenizer_source), sources={})


def tokenize_shard(output: Path, task: ShardTask) -> dict[str, Any]:
    """Runs in a worker: tokenize one shard into its .bin file, then write its record (both atomically)."""
    sources = _worker["sources"]
    if task.split not in sources:
        sources[task.split] = open_source(_worker["cfg"], task.split)
    tokenizer: Tokenizer = _worker["tokenizer"]
    dtype = token_dtype(task.identity["dtype"])
    (output / task.record).unlink(missing_ok=True)
    path = output / task.file
    temporary = path.with_name(path.name + ".tmp")
    documents = tokens = skipped = 0
    with open(temporary, "wb") as file:
        for chunk in _chunks(sources[task.split].records(task.index, 0), ENCODE_CHUNK_DOCS):
            texts = [text for text in chunk if text is not None]
            skipped += len(chunk) - len(texts)
            ids = tokenizer.encode(texts, num_threads=1)
            array = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=sum(map(len, ids)))
            array.tofile(file)
            documents, tokens = documents + len(texts), tokens + len(array)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    record = {**task.identity, "file": task.file, "documents": documents, "tokens": tokens, "skipped_lines": skipped}
    write_atomically(output / task.record, json.dumps(record, indent=1).encode())
    return record


def plan(cfg: Any, tokenizer: Tokenizer, shards: dict[str, Optional[int]]) -> list[ShardTask]:
    """Every shard to prepare, in split and name order."""
    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    tasks = []
    for split in SPLITS:
        source = open_source(cfg, split)
        for index, name in enumerate(source.shard_names[: shards[split]]):
            size = source.files[index].stat().st_size if isinstance(source, LocalShards) else None
            identity = {"format_version": FORMAT_VERSION, "source": name, "source_bytes": size,
                        "tokenizer_sha256": tokenizer.sha256, "dtype": dtype}
            tasks.append(ShardTask(split, index, identity))
    return tasks


def prepare(cfg: Any, output: Path, *, workers: int, shards: dict[str, Optional[int]],
            console: Optional[Console] = None) -> dict[str, Any]:
    """Prepare `output` from the text data `cfg` (see the module docstring); returns the manifest plus
    `run` statistics (tokens tokenized by this run, seconds, workers)."""
    if cfg.format != "text":
        raise DataError("prepare_data.py reads text shards (data=c4 or data=sample); data=tokens is what it writes")
    if workers < 1:
        raise DataError(f"workers={workers}: use at least one worker process")
    tokenizer = load_tokenizer(cfg)
    tasks = plan(cfg, tokenizer, shards)
    for split in SPLITS:
        if not any(task.split == split for task in tasks):
            raise DataError(f"{split}_shards={shards[split]}: prepare at least one {split} shard")
    for split in SPLITS:
        (output / split).mkdir(parents=True, exist_ok=True)
        for leftover in (output / split).glob("*.tmp"):  # an interrupted shard; its own task starts afresh
            leftover.unlink()
    (output / MANIFEST).unlink(missing_ok=True)
    fsync_directory(output)
    write_atomically(output / PREPARED_TOKENIZER, tokenizer._model_proto)

    records = {task.key: finished_record(output, task) for task in tasks}
    todo = [task for task in tasks if records[task.key] is None]
    started, new_tokens = time.perf_counter(), 0
    if todo:
        workers = min(workers, len(todo))
        columns = (TextColumn("tokenizing {task.fields[what]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[tokens]:,} tokens"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console or Console(stderr=True)) as progress, ProcessPoolExecutor(
            workers, initializer=_start_worker, initargs=(cfg, tokenizer._model_proto, tokenizer.source)
        ) as pool:
            bar = progress.add_task("", total=len(todo), what=f"{len(todo)} shard(s), {workers} process(es)", tokens=0)
            pending = {pool.submit(tokenize_shard, output, task): task for task in todo}
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    task = pending.pop(future)
                    if future.exception() is not None:  # keep what finished, start nothing new
                        pool.shutdown(cancel_futures=True)
                        raise future.exception()
                    records[task.key] = future.result()
                    new_tokens += records[task.key]["tokens"]
                    progress.update(bar, advance=1, tokens=new_tokens)
    for split in SPLITS:
        fsync_directory(output / split)
    manifest = build_manifest(cfg, tokenizer, tasks, records)
    write_atomically(output / MANIFEST, json.dumps(manifest, indent=1).encode())
    fsync_directory(output)
    seconds = time.perf_counter() - started
    return {**manifest, "run": {"tokens": new_tokens, "shards": len(todo), "seconds": seconds, "workers": workers}}


def build_manifest(cfg: Any, tokenizer: Tokenizer, tasks: list[ShardTask],
                   records: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    splits = {}
    for split in SPLITS:
        mine = [records[task.key] for task in tasks if task.split == split]
        shards = [{"name": r["source"], "file": r["file"], "source_bytes": r["source_bytes"], "documents": r["documents"],
                   "tokens": r["tokens"], "skipped_lines": r["skipped_lines"]} for r in mine]
        splits[split] = {key: sum(r[key] for r in mine) for key in ("documents", "tokens", "skipped_lines")}
        splits[split]["shards"] = shards
    return {
        "format_version": FORMAT_VERSION,
        "source": str(resolve_repo_path(str(cfg.path))) if cfg.path is not None else f"{cfg.hub_id}/{cfg.hub_config}",
        "tokenizer": {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "source": tokenizer.source,
                      "file": PREPARED_TOKENIZER, "eos_id": tokenizer.eos_id},
        "dtype": tasks[0].identity["dtype"],
        "splits": splits,
    }


def disk_bytes(output: Path) -> int:
    return sum(path.stat().st_size for path in output.rglob("*") if path.is_file())
