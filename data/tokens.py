"""Training on prepared token files (`data=tokens`): packed rows read straight from memory-mapped shards.

scripts/prepare_data.py (data.prepare) tokenizes the text shards once. A split's files, in shard
name order, hold one token stream: every document's ids followed by EOS, as the text pipeline
packs them. With S = seq_len, window w is stream[w*S : w*S + S + 1] (input_ids = window[:-1],
targets = window[1:]), and an epoch visits its W = (N - 1) // S windows in the order
`numpy.random.default_rng([seed, epoch]).permutation(W)` (file order with shuffle=false). Global
row g is therefore window order_{g // W}[g % W]: a pure function of (seed, g) that each rank and
DataLoader worker evaluates for its own rows, reading nothing else. 1 and N processes see the same
global batches, resume is O(1) (the state is g), and the last (N - 1) % S targets of the stream
are not trained on in an epoch.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.config import PREPARED_TOKENIZER, REPO_ROOT, DataError, prepared_directory
from data.stream import check_fingerprint, windows_to_batch
from data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")


def token_dtype(name: str) -> np.dtype:
    """The on-disk dtype: little-endian, whatever the machine."""
    return np.dtype(name).newbyteorder("<")


def prepare_command(directory: Path) -> str:
    return f"python scripts/prepare_data.py data=<c4|sample> [data.path=... data.tokenizer=...] output={directory}"


@functools.lru_cache(maxsize=64)
def _memmap(path: str, dtype: str, length: int) -> np.memmap:
    """Shards are opened lazily and at most 64 at a time, so 1024 shards cost no 1024 file handles."""
    return np.memmap(path, dtype=token_dtype(dtype), mode="r", shape=(length,))


class TokenStream:
    """A prepared split's shard files read as one array of token ids."""

    def __init__(self, directory: Path, shards: list[dict[str, Any]], dtype: str):
        self.dtype = dtype
        self.files = [str(directory / shard["file"]) for shard in shards if shard["tokens"]]
        self.lengths = [shard["tokens"] for shard in shards if shard["tokens"]]
        self.starts = np.cumsum([0, *self.lengths])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int64, across shard boundaries."""
        parts = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self.starts[shard + 1]))
            offset = int(self.starts[shard])
            parts.append(_memmap(self.files[shard], self.dtype, self.lengths[shard])[start - offset:end - offset])
            start, shard = end, shard + 1
        return np.concatenate(parts).astype(np.int64)


class Prepared:
    """A finished preparation: its manifest checked against the files on disk."""

    def __init__(self, cfg: Any):
        directory = prepared_directory(cfg)
        rerun = f"run `{prepare_command(directory)}` (it resumes where it stopped)"
        if not directory.is_dir():
            raise DataError(f"prepared data directory {directory} does not exist (data.path={cfg.path!r}; relative "
                            f"paths are resolved against {REPO_ROOT}): {rerun}")
        path = directory / MANIFEST
        if not path.is_file():
            raise DataError(f"{directory} has no {MANIFEST}, so its preparation never finished (the manifest is "
                            f"written last): {rerun}")
        try:
            manifest = json.loads(path.read_text())
            version = manifest["format_version"]
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"{path} is not a manifest of scripts/prepare_data.py ({error}): {rerun}") from None
        if version != FORMAT_VERSION:
            raise DataError(f"{path} has format version {version}, this code reads version {FORMAT_VERSION}: prepare "
                            f"the data again into a new directory")
        itemsize = token_dtype(manifest["dtype"]).itemsize
        for split in SPLITS:
            for shard in manifest["splits"][split]["shards"]:
                file = directory / shard["file"]
                expected = shard["tokens"] * itemsize
                size = file.stat().st_size if file.is_file() else None
                if size != expected:
                    raise DataError(f"{file} is {'missing' if size is None else f'{size} bytes'} but {path} says "
                                    f"{expected} bytes: the prepared directory is damaged; {rerun}")
        self.directory, self.path, self.manifest = directory, path, manifest

    def check_tokenizer(self, cfg: Any, tokenizer: Tokenizer) -> None:
        expected = self.manifest["tokenizer"]
        if tokenizer.sha256 != expected["sha256"]:
            raise DataError(
                f"data.tokenizer={cfg.tokenizer!r} ({tokenizer.source}, sha256 {tokenizer.sha256[:16]}...) is not the "
                f"tokenizer {self.path} was prepared with ({expected['source']}, sha256 {expected['sha256'][:16]}...): "
                f"set data.tokenizer=null to use its copy {self.directory / PREPARED_TOKENIZER}, or prepare again"
            )

    def stream(self, split: str) -> TokenStream:
        return TokenStream(self.directory, self.manifest["splits"][split]["shards"], self.manifest["dtype"])


def open_prepared(cfg: Any, tokenizer: Tokenizer) -> Prepared:
    """The prepared directory of `cfg.path`, refusing paper mode and a tokenizer other than its own."""
    if not cfg.packing:
        raise DataError("data=tokens trains on packed rows only (data.packing=true); the papers' padded rows "
                        "(data.packing=false) need the text pipeline, data=c4")
    prepared = Prepared(cfg)
    prepared.check_tokenizer(cfg, tokenizer)
    return prepared


class TokenWindows:
    """Global row g -> its window of seq_len + 1 tokens (see the module docstring)."""

    def __init__(self, stream: TokenStream, *, seq_len: int, shuffle: bool, seed: int):
        if seq_len < 2:
            raise DataError(f"data.seq_len must be >= 2 (got {seq_len})")
        self.stream, self.seq_len, self.shuffle, self.seed = stream, seq_len, shuffle, seed
        self.count = (len(stream) - 1) // seq_len
        if self.count == 0:
            raise DataError(f"the prepared train split holds {len(stream)} tokens, fewer than one row of {seq_len} + 1")
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's window order: 4 bytes per window, computed once per epoch and process."""
        if epoch not in self._orders:
            order = np.arange(self.count, dtype=np.uint32 if self.count < 2**32 else np.int64)
            if self.shuffle:
                np.random.default_rng([self.seed, epoch]).shuffle(order)
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # a batch may straddle two
            self._orders[epoch] = order
        return self._orders[epoch]

    def rows(self, first: int, stop: int) -> np.ndarray:
        """Windows of global rows [first, stop) as int64 [stop - first, seq_len + 1]."""
        windows = []
        for row in range(first, stop):
            epoch, k = divmod(row, self.count)
            start = int(self.order(epoch)[k]) * self.seq_len
            windows.append(self.stream.read(start, start + self.seq_len + 1))
        return np.stack(windows)


class TokenBatches(Dataset):
    """Batch k of one rank: global rows [k*G + r*B, k*G + (r+1)*B), G = B * world_size."""

    def __init__(self, windows: TokenWindows, *, rank: int, world_size: int, micro_batch_size: int):
        if not 0 <= rank < world_size or micro_batch_size < 1:
            raise DataError(f"invalid rank={rank}, world_size={world_size}, micro_batch_size={micro_batch_size}")
        self.windows, self.rank, self.micro_batch_size = windows, rank, micro_batch_size
        self.global_batch_rows = micro_batch_size * world_size

    def __getitem__(self, batch: int) -> dict[str, torch.Tensor]:
        first = batch * self.global_batch_rows + self.rank * self.micro_batch_size
        windows = self.windows.rows(first, first + self.micro_batch_size)
        return windows_to_batch(windows, np.full(len(windows), windows.shape[1]))


class TokenTrainLoader:
    """The `data=tokens` counterpart of data.stream.TrainLoader: endless batches, O(1) exact resume.

    `skipped_lines` is constant: the corrupt lines that preparation skipped in the train split.
    """

    def __init__(self, batches: TokenBatches, num_workers: int, fingerprint: dict[str, Any], description: str,
                 skipped_lines: int):
        self._batches, self._num_workers = batches, num_workers
        self._fingerprint, self._description = fingerprint, description
        self._next_batch = 0
        self._iterator: Optional[Any] = None
        self.skipped_lines = skipped_lines

    def __iter__(self) -> "TokenTrainLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:  # workers fetch batches k, k+1, ... round robin; DataLoader keeps the order
            self._iterator = iter(DataLoader(
                self._batches, batch_size=None, sampler=range(self._next_batch, sys.maxsize),
                num_workers=self._num_workers, prefetch_factor=2 if self._num_workers else None,
            ))
        batch = next(self._iterator)
        self._next_batch += 1
        return batch

    def describe(self) -> str:
        return self._description

    def stats(self) -> dict[str, int]:
        return {"skipped_lines": self.skipped_lines}

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self._next_batch * self._batches.global_batch_rows, "fingerprint": dict(self._fingerprint)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._iterator is not None:
            raise DataError("load the data loader state before drawing batches from it")
        check_fingerprint(state["fingerprint"], self._fingerprint)
        rows, size = state["rows"], self._batches.global_batch_rows
        if rows % size:
            raise DataError(f"the saved data position (row {rows}) is not at a global batch boundary for "
                            f"micro_batch_size * world_size = {size}; resume with the global batch size it was saved with")
        self._next_batch = rows // size


def build_token_loader(cfg: Any, tokenizer: Tokenizer, *, rank: int, world_size: int, micro_batch_size: int,
                       seed: int) -> TokenTrainLoader:
    """This rank's endless training batches from the prepared directory `cfg.path`."""
    prepared = open_prepared(cfg, tokenizer)
    windows = TokenWindows(prepared.stream("train"), seq_len=cfg.seq_len, shuffle=cfg.shuffle, seed=seed)
    batches = TokenBatches(windows, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size)
    train = prepared.manifest["splits"]["train"]
    fingerprint = {
        "format": "tokens", "tokenizer_sha256": tokenizer.sha256, "train_tokens": train["tokens"],
        "shards": [shard["name"] for shard in train["shards"]], "seq_len": cfg.seq_len, "shuffle": cfg.shuffle,
        "seed": seed,
    }
    description = (f"data: prepared tokens {prepared.directory}: {train['tokens']:,} train tokens, "
                   f"{windows.count:,} rows per epoch; each rank and worker reads only its own rows")
    return TokenTrainLoader(batches, cfg.num_workers, fingerprint, description, train["skipped_lines"])


def token_validation_rows(cfg: Any, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The first ceil(val_tokens / seq_len) windows of the prepared validation split, as the text
    pipeline cuts them: (windows [N, seq_len + 1], real lengths [N])."""
    stream = open_prepared(cfg, tokenizer).stream("validation")
    available = (len(stream) - 1) // cfg.seq_len
    wanted = math.ceil(cfg.val_tokens / cfg.seq_len)
    if available == 0:
        raise DataError(f"the prepared validation split holds {len(stream)} tokens, fewer than one row of "
                        f"{cfg.seq_len} + 1")
    if available < wanted:
        logger.warning("validation split exhausted: %d tokens instead of data.val_tokens=%d",
                       available * cfg.seq_len, cfg.val_tokens)
    n = min(wanted, available)
    tokens = stream.read(0, n * cfg.seq_len + 1)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, cfg.seq_len + 1)[::cfg.seq_len]
    return np.ascontiguousarray(windows), np.full(n, cfg.seq_len + 1)
