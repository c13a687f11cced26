"""The training row stream: shuffled, packed or padded, world-size invariant and exactly resumable.

Design. One deterministic *global* sequence of rows is defined by the data, the tokenizer, the
seed and the batching mode, never by the number of processes:
  * epoch e visits the shards in an order permuted by (seed, e);
  * each shard is cut into blocks of `shuffle_buffer` consecutive lines; the valid documents of a
    block are permuted by (seed, e, shard, block) (a block shuffle: exactly reproducible, unlike a
    streaming reservoir, and resumable from a line offset);
  * packing: documents, each ending in EOS, are concatenated into one token stream; row k is the
    window stream[k*seq_len : k*seq_len + seq_len + 1] (leftovers carry into the next row, across
    blocks, shards and epochs), so consecutive rows share one token and every token but the first
    is a target exactly once; paper mode: one row per document, truncated or padded with pad id 0.
A row becomes input_ids = window[:-1] and targets = window[1:] (-100 where the target is padding or
past the row), so T = seq_len is the model's input length in both modes.
With G = micro_batch_size * world_size, the k-th batch of rank r holds global rows
[k*G + r*B, k*G + (r+1)*B). Every rank walks the whole document stream and keeps its own rows; in
packing mode it must tokenize every document to know where rows end (SentencePiece encodes about
7M tokens/s per core, small next to a training step), in paper mode it tokenizes only its own.

Resume. The position at the end of a global batch (epoch, shard, block, document, token offset,
row; in packing mode the first token of the next window, which is also the last of the previous
one) is the same on every rank, so any rank's state resumes any rank. Resuming re-reads the
current block's lines (raw lines of earlier blocks are skipped without parsing) and re-tokenizes
only the one document the position points into. DataLoader workers each produce every W-th
batch; `torchdata`'s StatefulDataLoader keeps one such state per worker and replays the same
interleaving.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from data.config import DataError
from data.sources import HubShards, LocalShards, open_source
from data.tokenizer import Tokenizer

IGNORE_INDEX = -100
TOKENIZE_CHUNK_DOCS = 256


@dataclass
class StreamPosition:
    """Where the next row starts; `skipped_before_block` counts corrupt lines before `block`."""

    epoch: int = 0
    shard_pos: int = 0
    block: int = 0
    doc: int = 0
    token_offset: int = 0
    row: int = 0
    skipped_before_block: int = 0


@dataclass
class _Document:
    epoch: int
    shard_pos: int
    block: int
    doc: int
    text: str
    skipped_before_block: int
    skipped_total: int


@dataclass
class _Row:
    index: int
    tokens: Optional[list[int]]
    position_after: StreamPosition
    skipped_total: int


def paper_window(tokens: list[int], seq_len: int, pad_id: int) -> tuple[list[int], int]:
    """The papers' row, truncated to seq_len keeping T5's final EOS as `tokenizer(...,
    truncation=True, max_length=seq_len, padding="max_length")` does, right-padded to seq_len + 1
    so that its targets are the row shifted left; returns (window, real length)."""
    if len(tokens) > seq_len:
        tokens = tokens[: seq_len - 1] + tokens[-1:]
    return tokens + [pad_id] * (seq_len + 1 - len(tokens)), len(tokens)


def windows_to_batch(windows: list[list[int]] | np.ndarray, real_lengths: list[int] | np.ndarray) -> dict[str, torch.Tensor]:
    """input_ids = window[:-1] and targets = window[1:], with -100 where the target lies at or past
    the window's real length (padding, or a row with nothing after its last real token)."""
    windows = torch.as_tensor(np.asarray(windows), dtype=torch.long)
    input_ids, targets = windows[:, :-1].contiguous(), windows[:, 1:].clone()
    target_positions = torch.arange(1, windows.shape[1])
    targets[target_positions[None, :] >= torch.as_tensor(np.asarray(real_lengths))[:, None]] = IGNORE_INDEX
    return {"input_ids": input_ids, "targets": targets}


class RowStream:
    """The global row sequence from a position on (see the module docstring)."""

    def __init__(self, source: LocalShards | HubShards, tokenizer: Tokenizer, *, seq_len: int, packing: bool,
                 shuffle: bool, shuffle_buffer: int, seed: int):
        if seq_len < 2 or shuffle_buffer < 1:
            raise DataError(f"data.seq_len must be >= 2 and data.shuffle_buffer >= 1 (got {seq_len}, {shuffle_buffer})")
        self.source, self.tokenizer = source, tokenizer
        self.seq_len, self.packing = seq_len, packing
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed

    def shard_order(self, epoch: int) -> list[int]:
        n = len(self.source.shard_names)
        if not self.shuffle:
            return list(range(n))
        return np.random.default_rng([self.seed, epoch]).permutation(n).tolist()

    def block_order(self, epoch: int, shard: int, block: int, n_docs: int) -> list[int]:
        if not self.shuffle:
            return list(range(n_docs))
        return np.random.default_rng([self.seed, epoch, shard, block]).permutation(n_docs).tolist()

    def _blocks(self, shard: int, first_block: int) -> Iterator[tuple[int, list[str], int]]:
        """(block index, valid texts in file order, corrupt line count) from `first_block` on."""
        records = self.source.records(shard, first_block * self.shuffle_buffer)
        block = first_block
        while True:
            lines = list(_take(records, self.shuffle_buffer))
            if not lines:
                return
            texts = [text for text in lines if text is not None]
            yield block, texts, len(lines) - len(texts)
            block += 1

    def documents(self, start: StreamPosition) -> Iterator[_Document]:
        epoch, shard_pos, first_block, first_doc = start.epoch, start.shard_pos, start.block, start.doc
        skipped = start.skipped_before_block
        while True:
            whole_epoch = shard_pos == 0 and first_block == 0 and first_doc == 0
            documents_this_epoch = 0
            order = self.shard_order(epoch)
            for position in range(shard_pos, len(order)):
                for block, texts, corrupt in self._blocks(order[position], first_block):
                    permutation = self.block_order(epoch, order[position], block, len(texts))
                    for doc in range(first_doc, len(texts)):
                        documents_this_epoch += 1
                        yield _Document(epoch, position, block, doc, texts[permutation[doc]], skipped, skipped + corrupt)
                    skipped += corrupt
                    first_doc = 0
                first_block = 0
            if whole_epoch and documents_this_epoch == 0:
                raise DataError(f"no valid documents (JSON lines with a 'text' field) in {self.source.shard_names}")
            epoch, shard_pos = epoch + 1, 0

    def rows(self, start: StreamPosition, wanted: Callable[[int], bool]) -> Iterator[_Row]:
        """Every row from `start`; `tokens` is filled only for rows where wanted(index)."""
        chunks = _chunks(self.documents(start), TOKENIZE_CHUNK_DOCS)
        if self.packing:
            yield from self._packed_rows(start, chunks, wanted)
        else:
            yield from self._paper_rows(start, chunks, wanted)

    def _paper_rows(self, start: StreamPosition, chunks: Iterator[list[_Document]],
                    wanted: Callable[[int], bool]) -> Iterator[_Row]:
        row = start.row
        for chunk in chunks:
            mine = [i for i in range(len(chunk)) if wanted(row + i)]
            encoded = dict(zip(mine, self.tokenizer.encode([chunk[i].text for i in mine])))
            for i, document in enumerate(chunk):
                after = StreamPosition(document.epoch, document.shard_pos, document.block, document.doc + 1, 0,
                                       row + 1, document.skipped_before_block)
                yield _Row(row, encoded.get(i), after, document.skipped_total)
                row += 1

    def _packed_rows(self, start: StreamPosition, chunks: Iterator[list[_Document]],
                     wanted: Callable[[int], bool]) -> Iterator[_Row]:
        row, carry, first = start.row, [], True
        for chunk in chunks:
            for document, tokens in zip(chunk, self.tokenizer.encode([d.text for d in chunk])):
                resumed = (document.epoch, document.shard_pos, document.block, document.doc) == (
                    start.epoch, start.shard_pos, start.block, start.doc)
                offset = start.token_offset if first and resumed else 0
                first = False
                while len(carry) + len(tokens) - offset > self.seq_len:
                    end = offset + self.seq_len + 1 - len(carry)
                    row_tokens = carry + tokens[offset:end] if wanted(row) else None
                    offset, carry = end - 1, []  # the window's last token starts the next one
                    after = StreamPosition(document.epoch, document.shard_pos, document.block, document.doc,
                                           offset, row + 1, document.skipped_before_block)
                    yield _Row(row, row_tokens, after, document.skipped_total)
                    row += 1
                carry = carry + tokens[offset:]


def _take(iterator: Iterator, n: int) -> Iterator:
    for _, item in zip(range(n), iterator):
        yield item


def _chunks(iterator: Iterator, size: int) -> Iterator[list]:
    while chunk := list(_take(iterator, size)):
        yield chunk


class TrainRows(IterableDataset):
    """Yields this rank's micro-batches; in a DataLoader worker, every W-th of them."""

    def __init__(self, stream: RowStream, *, rank: int, world_size: int, micro_batch_size: int):
        if not 0 <= rank < world_size or micro_batch_size < 1:
            raise DataError(f"invalid rank={rank}, world_size={world_size}, micro_batch_size={micro_batch_size}")
        self.stream, self.rank, self.micro_batch_size = stream, rank, micro_batch_size
        self.global_batch_rows = micro_batch_size * world_size
        self._position = StreamPosition()
        self._skipped_lines = 0

    def state_dict(self) -> dict[str, Any]:
        return {"position": dataclasses.asdict(self._position), "skipped_lines": self._skipped_lines}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        position = StreamPosition(**state["position"])
        if position.row % self.global_batch_rows:
            raise DataError(
                f"the saved data position (row {position.row}) is not at a global batch boundary for "
                f"micro_batch_size * world_size = {self.global_batch_rows}; resume with the global batch size it was saved with"
            )
        self._position, self._skipped_lines = position, state["skipped_lines"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        size, rank, micro = self.global_batch_rows, self.rank, self.micro_batch_size

        def wanted(row: int) -> bool:
            return (row // size) % num_workers == worker and (row % size) // micro == rank

        rows, lengths = [], []
        for row in self.stream.rows(self._position, wanted):
            if row.tokens is not None:
                tokens, length = (
                    (row.tokens, len(row.tokens)) if self.stream.packing
                    else paper_window(row.tokens, self.stream.seq_len, self.stream.tokenizer.pad_id)
                )
                rows.append(tokens)
                lengths.append(length)
            finished_batch = row.position_after.row // size - 1
            if row.position_after.row % size == 0 and finished_batch % num_workers == worker:
                self._position, self._skipped_lines = row.position_after, row.skipped_total
                batch: dict[str, Any] = windows_to_batch(rows, lengths)
                batch["skipped_lines"] = row.skipped_total
                yield batch
                rows, lengths = [], []


class TrainLoader:
    """An endless iterator of {"input_ids", "targets"} batches (int64, [B, seq_len]; targets[b, i]
    follows input_ids[b, i], -100 where none does) with exact `state_dict` resume.

    `skipped_lines` is the number of corrupt shard lines (invalid JSON or no `text`) met so far
    in the stream; the trainer logs it.
    """

    def __init__(self, dataset: TrainRows, num_workers: int, fingerprint: dict[str, Any]):
        with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch API here
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            self._loader = StatefulDataLoader(
                dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                prefetch_factor=2 if num_workers > 0 else None,
            )
        self._fingerprint = fingerprint
        self._iterator: Optional[Iterator] = None
        self.skipped_lines = 0

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = iter(self._loader)
        batch = next(self._iterator)
        self.skipped_lines = int(batch.pop("skipped_lines"))
        return batch

    def stats(self) -> dict[str, int]:
        return {"skipped_lines": self.skipped_lines}

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self._loader.state_dict(), "skipped_lines": self.skipped_lines,
                "fingerprint": dict(self._fingerprint)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._iterator is not None:
            raise DataError("load the data loader state before drawing batches from it")
        changed = {k: (v, self._fingerprint.get(k)) for k, v in state["fingerprint"].items() if self._fingerprint.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise DataError(f"cannot resume the data stream exactly, its settings changed ({details})")
        self._loader.load_state_dict(state["loader"])
        self.skipped_lines = state["skipped_lines"]


def build_train_loader(cfg: Any, tokenizer: Tokenizer, *, rank: int, world_size: int, micro_batch_size: int,
                       seed: Optional[int] = None) -> TrainLoader:
    """This rank's endless training batches. `seed` (default `cfg.seed`) fixes the shuffle.

    The global batch is the same for any split of micro_batch_size * world_size; a state saved on
    any rank resumes any rank (with the same global batch size and num_workers).
    """
    seed = cfg.seed if seed is None else seed
    stream = RowStream(open_source(cfg, "train"), tokenizer, seq_len=cfg.seq_len, packing=cfg.packing,
                       shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer, seed=seed)
    dataset = TrainRows(stream, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size)
    fingerprint = {
        "shards": list(stream.source.shard_names), "tokenizer_vocab_size": tokenizer.vocab_size,
        "seq_len": cfg.seq_len, "packing": cfg.packing, "shuffle": cfg.shuffle,
        "shuffle_buffer": cfg.shuffle_buffer, "seed": seed, "num_workers": cfg.num_workers,
    }
    return TrainLoader(dataset, cfg.num_workers, fingerprint)
