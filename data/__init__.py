"""C4-style text pipeline: typed config, SentencePiece tokenizer, resumable train stream, validation,
and prepared token files (`data=tokens`, written by scripts/prepare_data.py).

See docs/data.md for the design (global row stream, packing vs. the papers' padded rows, lanes, resume).
"""
from typing import Any, Optional

from data.config import DataConfig, DataError, register_configs
from data.stream import TrainLoader, build_text_loader
from data.tokenizer import Tokenizer, export_tokenizer, load_tokenizer
from data.tokens import Prepared, TokenTrainLoader, build_token_loader
from data.validation import build_val_batches

FORMATS = ("text", "tokens")


def build_tokenizer(cfg: Any) -> Tokenizer:
    """The tokenizer `cfg.tokenizer` names; with data=tokens the prepared directory is checked first,
    so that an unfinished one is reported as such rather than as a missing tokenizer file."""
    if cfg.format == "tokens":
        Prepared(cfg)
    return load_tokenizer(cfg)


def build_train_loader(cfg: Any, tokenizer: Tokenizer, *, rank: int, world_size: int, micro_batch_size: int,
                       seed: Optional[int] = None) -> TrainLoader | TokenTrainLoader:
    """This rank's endless training batches (`data.format` text or tokens). `seed` (default `cfg.seed`)
    fixes the shuffle. The global batch is the same for any split of micro_batch_size * world_size."""
    if cfg.format not in FORMATS:
        raise DataError(f"data.format={cfg.format!r} is not one of {FORMATS}")
    build = build_token_loader if cfg.format == "tokens" else build_text_loader
    return build(cfg, tokenizer, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size,
                 seed=cfg.seed if seed is None else seed)


__all__ = [
    "DataConfig",
    "DataError",
    "TokenTrainLoader",
    "Tokenizer",
    "TrainLoader",
    "build_tokenizer",
    "build_train_loader",
    "build_val_batches",
    "export_tokenizer",
    "register_configs",
]
