"""The training row stream: shuffled, packed or padded, world-size invariant and exactly resumable.

Design. One deterministic *global* sequence of rows is defined by the data, the tokenizer, the
seed, the batching mode and the lanes, never by the number of processes or DataLoader workers:
  * the train shards are dealt to `data.lanes` lanes (shard i to lane i mod lanes); each lane is
    its own row stream, and the global rows take runs of `data.lane_rows` consecutive rows from
    lane 0, 1, ..., lanes - 1 in turn (one lane: the global rows are that lane's rows);
  * in a lane, epoch e visits its shards in an order permuted by (seed, e);
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
[k*G + r*B, k*G + (r+1)*B); with W DataLoader workers, worker w builds the w-th of W slices of
every such batch. A reader (a rank, or one of its workers) walks only the lanes its rows come from;
in packing mode it must tokenize every document of those lanes to know where rows end, in paper
mode only its own. So lanes share the reading among ranks without changing the global batch.

Resume. The position of each lane at the end of a global batch (epoch, shard, block, document,
token offset, row; in packing mode the first token of the next window, which is also the last of
the previous one) is a function of the batch, the same for every reader of that lane. Resuming
re-reads the current block's lines (raw lines of earlier blocks are skipped without parsing) and
re-tokenizes only the one document the position points into. `torchdata`'s StatefulDataLoader
keeps one such state per worker.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from data.config import DataError
from data.sources import HubShards, LocalShards, ShardSubset, open_source
from data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

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
    """One lane's row sequence from a position on (see the module docstring)."""

    def __init__(self, source: LocalShards | HubShards | ShardSubset, tokenizer: Tokenizer, *, seq_len: int,
                 packing: bool, shuffle: bool, shuffle_buffer: int, seed: int):
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


@dataclass(frozen=True)
class LaneLayout:
    """Global row g -> (lane, row within the lane): runs of `rows` consecutive rows go to lanes
    0, 1, ..., count - 1 in turn."""

    count: int
    rows: int

    def lane(self, row: int) -> int:
        return row // self.rows % self.count

    def lane_row(self, row: int) -> int:
        return row // (self.rows * self.count) * self.rows + row % self.rows

    def global_row(self, lane: int, lane_row: int) -> int:
        return lane_row // self.rows * self.rows * self.count + lane * self.rows + lane_row % self.rows

    def rows_before(self, lane: int, row: int) -> int:
        """How many of the global rows [0, row) belong to `lane`."""
        cycles, rest = divmod(row, self.rows * self.count)
        return cycles * self.rows + min(max(rest - lane * self.rows, 0), self.rows)


@dataclass(frozen=True)
class Reader:
    """Rows [start, stop) of every global batch of `size` rows: a rank's micro-batch, or a worker's slice of it."""

    size: int
    start: int
    stop: int

    @classmethod
    def of(cls, rank: int, world_size: int, micro_batch_size: int, worker: int, workers: int) -> "Reader":
        first = rank * micro_batch_size
        return cls(micro_batch_size * world_size, first + worker * micro_batch_size // workers,
                   first + (worker + 1) * micro_batch_size // workers)

    def rows(self, batch: int) -> range:
        return range(batch * self.size + self.start, batch * self.size + self.stop)

    def owns(self, row: int) -> bool:
        return self.start <= row % self.size < self.stop

    def lanes(self, layout: LaneLayout) -> list[int]:
        """The lanes this reader's rows come from (the pattern repeats after `period` batches)."""
        cycle = layout.rows * layout.count
        period = cycle // math.gcd(self.size, cycle)
        return sorted({layout.lane(row) for batch in range(period) for row in self.rows(batch)})


class TrainRows(IterableDataset):
    """Yields this rank's micro-batches; in DataLoader worker w of W, the w-th slice of each."""

    def __init__(self, lanes: list[RowStream], layout: LaneLayout, *, rank: int, world_size: int,
                 micro_batch_size: int, num_workers: int):
        if not 0 <= rank < world_size or micro_batch_size < 1:
            raise DataError(f"invalid rank={rank}, world_size={world_size}, micro_batch_size={micro_batch_size}")
        if num_workers > micro_batch_size:
            raise DataError(f"data.num_workers={num_workers} exceeds the micro batch size {micro_batch_size}: each "
                            f"worker builds a slice of every micro-batch; use at most {micro_batch_size} workers")
        self.lanes, self.layout = lanes, layout
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.workers = max(num_workers, 1)
        self.packing, self.seq_len, self.pad_id = lanes[0].packing, lanes[0].seq_len, lanes[0].tokenizer.pad_id
        self._rows_done = 0
        self._positions: dict[int, StreamPosition] = {}
        self._skipped: dict[int, int] = {}

    def reader(self) -> Reader:
        info = get_worker_info()
        return Reader.of(self.rank, self.world_size, self.micro_batch_size, info.id if info else 0, self.workers)

    def state_dict(self) -> dict[str, Any]:
        lanes = self.reader().lanes(self.layout)
        return {"rows": self._rows_done,
                "lanes": {str(lane): dataclasses.asdict(self._positions.get(lane, StreamPosition())) for lane in lanes},
                "skipped_lines": {str(lane): self._skipped.get(lane, 0) for lane in lanes}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rows, size = state["rows"], self.micro_batch_size * self.world_size
        if rows % size:
            raise DataError(
                f"the saved data position (row {rows}) is not at a global batch boundary for "
                f"micro_batch_size * world_size = {size}; resume with the global batch size it was saved with"
            )
        positions = {int(lane): StreamPosition(**position) for lane, position in state["lanes"].items()}
        for lane in self.reader().lanes(self.layout):
            if lane not in positions or positions[lane].row != self.layout.rows_before(lane, rows):
                raise DataError(f"the saved data state does not hold lane {lane} at row {rows}; resume with the "
                                f"world size, micro batch size and data.num_workers it was saved with")
        self._rows_done, self._positions = rows, positions
        self._skipped = {int(lane): count for lane, count in state["skipped_lines"].items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, layout = self.reader(), self.layout
        mine = reader.lanes(layout)
        streams = {
            lane: self.lanes[lane].rows(self._positions.setdefault(lane, StreamPosition()),
                                        lambda lane_row, lane=lane: reader.owns(layout.global_row(lane, lane_row)))
            for lane in mine
        }

        def advance(lane: int, until: int) -> Optional[_Row]:
            """Consume the lane's rows below `until`; the last one consumed."""
            row = None
            while self._positions[lane].row < until:
                row = next(streams[lane])
                self._positions[lane], self._skipped[lane] = row.position_after, row.skipped_total
            return row

        batch = self._rows_done // reader.size
        while True:
            windows, lengths = [], []
            for index in reader.rows(batch):
                row = advance(layout.lane(index), layout.lane_row(index) + 1)
                window, length = (
                    (row.tokens, len(row.tokens)) if self.packing
                    else paper_window(row.tokens, self.seq_len, self.pad_id)
                )
                windows.append(window)
                lengths.append(length)
            batch += 1
            for lane in mine:  # every lane at the batch boundary: the same position on every reader
                advance(lane, layout.rows_before(lane, batch * reader.size))
            self._rows_done = batch * reader.size
            part: dict[str, Any] = windows_to_batch(windows, lengths)
            part["skipped_lines"] = {lane: self._skipped.get(lane, 0) for lane in mine}
            yield part


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A DataError listing every stream setting that differs from the saved state's."""
    changed = {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)}
    if changed:
        details = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise DataError(f"cannot resume the data stream exactly, its settings changed ({details})")


class TrainLoader:
    """An endless iterator of {"input_ids", "targets"} batches (int64, [B, seq_len]; targets[b, i]
    follows input_ids[b, i], -100 where none does) with exact `state_dict` resume.

    `skipped_lines` is the number of corrupt shard lines (invalid JSON or no `text`) met so far
    in the lanes this rank reads; the trainer logs it.
    """

    def __init__(self, dataset: TrainRows, num_workers: int, fingerprint: dict[str, Any], description: str):
        with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch API here
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            self._loader = StatefulDataLoader(
                dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                prefetch_factor=2 if num_workers > 0 else None,
            )
        self._parts = dataset.workers
        self._fingerprint = fingerprint
        self._description = description
        self._iterator: Optional[Iterator] = None
        self._skipped: dict[int, int] = {}
        self.skipped_lines = 0

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = iter(self._loader)
        parts = [next(self._iterator) for _ in range(self._parts)]
        for part in parts:
            self._skipped.update(part.pop("skipped_lines"))
        self.skipped_lines = sum(self._skipped.values())
        return {key: torch.cat([part[key] for part in parts]) for key in ("input_ids", "targets")}

    def describe(self) -> str:
        """One line saying what each rank and worker reads."""
        return self._description

    def stats(self) -> dict[str, int]:
        return {"skipped_lines": self.skipped_lines}

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self._loader.state_dict(), "fingerprint": dict(self._fingerprint),
                "skipped_lines": {str(lane): count for lane, count in self._skipped.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._iterator is not None:
            raise DataError("load the data loader state before drawing batches from it")
        check_fingerprint(state["fingerprint"], self._fingerprint)
        self._loader.load_state_dict(state["loader"])
        self._skipped = {int(lane): count for lane, count in state["skipped_lines"].items()}
        self.skipped_lines = sum(self._skipped.values())


def describe_reading(layout: LaneLayout, n_shards: int, *, world_size: int, micro_batch_size: int, num_workers: int) -> str:
    """Which share of the lanes and shards the busiest rank and worker read."""
    def shards(lanes: set[int]) -> int:
        return sum(len(range(lane, n_shards, layout.count)) for lane in lanes)

    workers = max(num_workers, 1)
    per_worker = [[set(Reader.of(r, world_size, micro_batch_size, w, workers).lanes(layout)) for w in range(workers)]
                  for r in range(world_size)]
    rank_lanes = max((set().union(*lanes) for lanes in per_worker), key=len)
    worker_lanes = max((lanes for rank in per_worker for lanes in rank), key=len)
    line = (f"data: {layout.count} lane(s) of {layout.rows} rows over {n_shards} train shard(s); each of "
            f"{world_size} rank(s) reads at most {len(rank_lanes)} lane(s) ({shards(rank_lanes)} shard(s))")
    if num_workers:
        line += f", each of its {num_workers} workers {len(worker_lanes)} ({shards(worker_lanes)} shard(s))"
    return line


def build_text_loader(cfg: Any, tokenizer: Tokenizer, *, rank: int, world_size: int, micro_batch_size: int,
                      seed: int) -> TrainLoader:
    """This rank's endless training batches read and tokenized from text shards (see the module docstring)."""
    source = open_source(cfg, "train")
    n_shards = len(source.shard_names)
    if cfg.lanes < 1 or cfg.lane_rows < 1:
        raise DataError(f"data.lanes and data.lane_rows must be >= 1 (got {cfg.lanes}, {cfg.lane_rows})")
    if cfg.lanes > n_shards:
        raise DataError(f"data.lanes={cfg.lanes} needs at least {cfg.lanes} train shards but there are {n_shards}; "
                        f"set data.lanes={n_shards} or fewer (the lanes define the row order)")
    if n_shards % cfg.lanes:
        logger.warning("%d train shards do not divide into data.lanes=%d equal lanes: every lane gives as many rows, so "
                       "the shards of smaller lanes repeat sooner; use a multiple of %d shards", n_shards, cfg.lanes, cfg.lanes)
    layout = LaneLayout(cfg.lanes, cfg.lane_rows)
    lanes = [
        RowStream(ShardSubset(source, range(lane, n_shards, cfg.lanes)), tokenizer, seq_len=cfg.seq_len,
                  packing=cfg.packing, shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer,
                  seed=seed if cfg.lanes == 1 else int(np.random.SeedSequence([seed, lane]).generate_state(1)[0]))
        for lane in range(cfg.lanes)
    ]
    dataset = TrainRows(lanes, layout, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size,
                        num_workers=cfg.num_workers)
    fingerprint = {
        "shards": list(source.shard_names), "tokenizer_vocab_size": tokenizer.vocab_size,
        "seq_len": cfg.seq_len, "packing": cfg.packing, "shuffle": cfg.shuffle,
        "shuffle_buffer": cfg.shuffle_buffer, "seed": seed, "num_workers": cfg.num_workers,
        "lanes": cfg.lanes, "lane_rows": cfg.lane_rows,
        # Each reader keeps only its own lanes' positions: with several lanes, resume on the same readers.
        "lane_readers": [world_size, micro_batch_size] if cfg.lanes > 1 else None,
    }
    description = describe_reading(layout, n_shards, world_size=world_size, micro_batch_size=micro_batch_size,
                                   num_workers=cfg.num_workers)
    return TrainLoader(dataset, cfg.num_workers, fingerprint, description)
