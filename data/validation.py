"""Validation rows on a fixed token budget, split across ranks so the token-weighted mean is exact.

The rows are the first ones of the validation split in file order (no shuffle), built exactly as
in training (packed seq_len + 1 windows, or one padded document per row; with `data=tokens` the
same windows read from the prepared validation split), until they hold
`val_tokens` target tokens (target != -100). They are padded with all-ignored rows to a multiple
of micro_batch_size * world_size and dealt out like training rows, so every rank runs the same
number of batches and the union over ranks is the same set of rows for any world size or batch
size.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from data.config import DataError
from data.sources import open_source
from data.stream import TOKENIZE_CHUNK_DOCS, _chunks, paper_window, windows_to_batch
from data.tokenizer import Tokenizer
from data.tokens import token_validation_rows

logger = logging.getLogger(__name__)


def validation_rows(cfg: Any, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(windows [N, seq_len + 1], real lengths [N]) of the whole budget, identical on every rank."""
    if cfg.format == "tokens":
        return token_validation_rows(cfg, tokenizer)
    source = open_source(cfg, "validation")
    texts = (
        text
        for shard in range(len(source.shard_names))
        for text in source.records(shard, 0)
        if text is not None
    )
    rows, lengths, carry, tokens_kept = [], [], [], 0
    for chunk in _chunks(texts, TOKENIZE_CHUNK_DOCS):
        for tokens in tokenizer.encode(chunk):
            if cfg.packing:
                carry.extend(tokens)
                while len(carry) > cfg.seq_len and tokens_kept < cfg.val_tokens:
                    rows.append(np.asarray(carry[: cfg.seq_len + 1], dtype=np.int32))
                    lengths.append(cfg.seq_len + 1)
                    carry = carry[cfg.seq_len:]
                    tokens_kept += cfg.seq_len
            else:
                row, length = paper_window(tokens, cfg.seq_len, tokenizer.pad_id)
                rows.append(np.asarray(row, dtype=np.int32))
                lengths.append(length)
                tokens_kept += length - 1
            if tokens_kept >= cfg.val_tokens:
                return np.stack(rows), np.asarray(lengths)
    if not rows:
        raise DataError(f"the validation split ({source.shard_names}) is too small for one row of {cfg.seq_len} + 1 tokens")
    logger.warning("validation split exhausted: %d tokens instead of data.val_tokens=%d", tokens_kept, cfg.val_tokens)
    return np.stack(rows), np.asarray(lengths)


def build_val_batches(cfg: Any, tokenizer: Tokenizer, *, rank: int, world_size: int,
                      micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """This rank's validation batches: global rows [k*G + r*B, k*G + (r+1)*B) for batch k, with
    G = micro_batch_size * world_size; rows past the budget are padding whose targets are all -100,
    so a rank may get batches with no target token (sum losses, do not average per batch)."""
    if not 0 <= rank < world_size or micro_batch_size < 1:
        raise DataError(f"invalid rank={rank}, world_size={world_size}, micro_batch_size={micro_batch_size}")
    rows, lengths = validation_rows(cfg, tokenizer)
    size = micro_batch_size * world_size
    n_padding = -len(rows) % size
    rows = np.concatenate([rows, np.full((n_padding, cfg.seq_len + 1), tokenizer.pad_id, dtype=rows.dtype)])
    lengths = np.concatenate([lengths, np.zeros(n_padding, dtype=lengths.dtype)])
    batches = []
    for start in range(rank * micro_batch_size, len(rows), size):
        stop = start + micro_batch_size
        batches.append(windows_to_batch(rows[start:stop], lengths[start:stop]))
    return batches
