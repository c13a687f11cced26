"""C4-style text pipeline: typed config, SentencePiece tokenizer, resumable train stream, validation.

See docs/data.md for the design (global row stream, packing vs. the papers' padded rows, resume).
"""
from data.config import DataConfig, DataError, register_configs
from data.stream import TrainLoader, build_train_loader
from data.tokenizer import Tokenizer, build_tokenizer, export_tokenizer
from data.validation import build_val_batches

__all__ = [
    "DataConfig",
    "DataError",
    "Tokenizer",
    "TrainLoader",
    "build_tokenizer",
    "build_train_loader",
    "build_val_batches",
    "export_tokenizer",
    "register_configs",
]
