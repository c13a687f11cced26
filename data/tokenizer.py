"""SentencePiece tokenizer with T5's id layout (pad 0, eos 1, unk 2, no bos).

We call `sentencepiece.SentencePieceProcessor` directly instead of a `transformers` tokenizer: its
batched C++ encode is about 10x faster on CPU, it has no 5.x pitfalls (`T5Tokenizer(vocab_file=...)`
silently builds a 104-entry vocabulary), and `t5-base`'s `spiece.model` is the same file either way.
"""
from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from data.config import PREPARED_TOKENIZER, REPO_ROOT, DataError, prepared_directory, resolve_repo_path
from data.hub import hub_unreachable_message, is_connection_error

T5_PAD_ID, T5_EOS_ID, T5_UNK_ID = 0, 1, 2
EXPORT_PROBE = "Export check: the river city's 1,024 schools,\n\nand  two\tspaces. Ünïcödé ½ \u00a0"


class Tokenizer:
    """Encodes documents as T5's tokenizer does: pieces followed by EOS, no BOS."""

    pad_id = T5_PAD_ID
    eos_id = T5_EOS_ID
    unk_id = T5_UNK_ID

    def __init__(self, model_proto: bytes, source: str):
        self.source = source
        self._model_proto = model_proto
        not_a_model = DataError(f"tokenizer file {source} is not a SentencePiece model; use a .model file "
                                f"such as t5-base's spiece.model or data/sample/tokenizer/spiece.model")
        try:
            self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError:  # sentencepiece's protobuf parse error, a C++ message of no use here
            raise not_a_model from None
        if self._processor.get_piece_size() == 0:  # an empty file parses as an empty model
            raise not_a_model
        layout = (self._processor.pad_id(), self._processor.eos_id(), self._processor.unk_id(), self._processor.bos_id())
        if layout != (T5_PAD_ID, T5_EOS_ID, T5_UNK_ID, -1):
            raise DataError(
                f"tokenizer {source} has ids (pad, eos, unk, bos) = {layout}; the data pipeline needs "
                f"T5's layout (0, 1, 2, none), e.g. t5-base's spiece.model or data/sample/tokenizer"
            )
        self.vocab_size: int = self._processor.get_piece_size()
        # Identifies the tokenizer in prepared token files: same bytes, same ids.
        self.sha256: str = hashlib.sha256(model_proto).hexdigest()

    def encode(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Each text's ids followed by EOS; `num_threads=1` when the caller runs one process per core."""
        return [ids + [T5_EOS_ID] for ids in self._processor.encode(list(texts), out_type=int, num_threads=num_threads)]

    def decode(self, ids: Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Text of one id sequence, or of each of a batch; pad and EOS decode to nothing."""
        if len(ids) and not isinstance(ids[0], int):
            return [self._processor.decode([int(i) for i in row]) for row in ids]
        return self._processor.decode([int(i) for i in ids])

    def __getstate__(self) -> dict[str, Any]:
        """Pickled as the model bytes, so DataLoader workers started with `spawn` get a copy."""
        return {"model_proto": self._model_proto, "source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_proto"], state["source"])

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


def load_tokenizer(cfg: Any) -> Tokenizer:
    """Load `cfg.tokenizer`: a `.model` file, a directory holding `spiece.model`, or a hub id
    (e.g. `t5-base`) whose `spiece.model` is fetched with `huggingface_hub`.

    A value that names an existing path (absolute, or relative to the repository root) or looks
    like a file path (ends in `.model`, starts with `.`, `/` or `~`) is local; anything else is a
    hub id. With `data=tokens`, `null` is the copy that scripts/prepare_data.py keeps beside the tokens.
    """
    if cfg.tokenizer is None:
        if cfg.format != "tokens":
            raise DataError("data.tokenizer is not set: name a SentencePiece .model file, a directory holding "
                            "spiece.model, or a hub id such as t5-base")
        value = str(prepared_directory(cfg) / PREPARED_TOKENIZER)
    else:
        value = str(cfg.tokenizer)
    local = resolve_repo_path(value)
    if local.exists() or value.endswith(".model") or value.startswith((".", "/", "~")):
        model_file = local / "spiece.model" if local.is_dir() else local
        if not model_file.is_file():
            raise DataError(
                f"tokenizer file {model_file} not found (data.tokenizer={value!r}, relative paths are "
                f"resolved against {REPO_ROOT}); point data.tokenizer at a SentencePiece .model file or "
                f"a directory containing spiece.model (t5-base's, or data/sample/tokenizer)"
            )
        return _load(model_file.read_bytes(), str(model_file), value)
    return _load(Path(_download_spiece_model(value)).read_bytes(), f"{value}/spiece.model", value)


def _load(model_proto: bytes, source: str, value: str) -> Tokenizer:
    """The Tokenizer, or its DataError prefixed with the config key to change."""
    try:
        return Tokenizer(model_proto, source)
    except DataError as error:
        raise DataError(f"data.tokenizer={value!r}: {error}") from None


def _download_spiece_model(repo_id: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, "spiece.model")
    except Exception as error:
        if is_connection_error(error):
            remedy = f"download {repo_id}'s spiece.model and set data.tokenizer=/path/to/spiece.model"
            raise DataError(hub_unreachable_message(f"tokenizer {repo_id!r}", remedy)) from error
        raise DataError(f"could not fetch spiece.model from hub repo {repo_id!r}: {error}") from error


def export_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> None:
    """Write `tokenizer` into `directory` (e.g. a `save_pretrained` export) so that
    `transformers.AutoTokenizer.from_pretrained(directory)` works offline and encodes like
    `tokenizer.encode`: pieces then EOS, pad 0, eos 1, unk 2, no BOS, no T5 sentinel ids.

    Writes tokenizer.json (no sentencepiece or protobuf needed to load it), tokenizer_config.json
    and spiece.model (so `data.tokenizer=<directory>` works too). The conversion runs in a fresh
    directory: `from_pretrained` would otherwise prefer stale tokenizer files already in `directory`.
    """
    from transformers import T5TokenizerFast  # `T5Tokenizer` itself in transformers 5.x

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "spiece.model").write_bytes(tokenizer._model_proto)
        converted = T5TokenizerFast.from_pretrained(scratch, extra_ids=0, legacy=False)
    expected = tokenizer.encode([EXPORT_PROBE])[0]
    got = converted(EXPORT_PROBE)["input_ids"]
    if len(converted) != tokenizer.vocab_size or got != expected:
        raise DataError(f"transformers converted tokenizer {tokenizer.source} into a different one ({len(converted)} "
                        f"entries, probe ids {got[:8]}... instead of {tokenizer.vocab_size}, {expected[:8]}...)")
    converted.save_pretrained(str(directory))
    (directory / "spiece.model").write_bytes(tokenizer._model_proto)
