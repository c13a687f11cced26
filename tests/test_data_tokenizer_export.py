"""The `hf/` export carries its tokenizer: AutoTokenizer + AutoModelForCausalLM load it offline (as
lm-eval's `hf` model type does) and the tokenizer encodes exactly as training did.

The reference ids come from sentencepiece itself plus the EOS that ends every training document.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import data
from data import DataConfig, DataError, build_tokenizer, export_tokenizer
from models import ModelConfig, build_model

SPIECE = Path(data.__file__).resolve().parent / "sample" / "tokenizer" / "spiece.model"
TEXTS = [
    "The river flows through the old city, past the school and the market.",
    "  Leading and trailing spaces, double  spaces and a tab\there.  ",
    "Lines\nof a web page\n\nwith blank lines between them.",
    "Numbers 1,024 and 3.14159; Ünïcödé, ｆｕｌｌｗｉｄｔｈ letters, ½ and an emoji 🙂.",
    "",
]


def reference_ids(texts: list[str]) -> list[list[int]]:
    processor = spm.SentencePieceProcessor(model_file=str(SPIECE))
    return [ids + [processor.eos_id()] for ids in processor.encode(texts)]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny LLaMA saved with save_pretrained, then the sample tokenizer exported next to it."""
    directory = tmp_path_factory.mktemp("run") / "hf"
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=8192))
    model.save_pretrained(directory)
    export_tokenizer(build_tokenizer(DataConfig(tokenizer=str(SPIECE))), directory)
    return directory


def test_auto_tokenizer_encodes_like_training(export):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(export))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id) == (0, 1, 2, None)
    assert len(tokenizer) == 8192  # no T5 sentinel ids beyond the model's vocabulary
    with gzip.open(SPIECE.parent.parent / "en" / "c4-validation.00000-of-00001.json.gz", "rt", encoding="utf-8") as f:
        corpus = [json.loads(line)["text"] for line in f]
    texts = TEXTS + corpus
    assert tokenizer(texts)["input_ids"] == reference_ids(texts)
    assert tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"] == reference_ids(TEXTS[:1])[0][:-1]
    assert tokenizer.decode(reference_ids(TEXTS[:1])[0], skip_special_tokens=True) == TEXTS[0]


def test_auto_model_loads_and_generates_from_the_export(export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(export))
    model = AutoModelForCausalLM.from_pretrained(str(export))
    prompt = tokenizer("The river flows through", add_special_tokens=False, return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    assert output.shape == (1, prompt["input_ids"].shape[1] + 5)
    assert torch.equal(output[0, : prompt["input_ids"].shape[1]], prompt["input_ids"][0])
    assert isinstance(tokenizer.decode(output[0, prompt["input_ids"].shape[1]:]), str)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_the_export_is_also_a_data_tokenizer_directory(export):
    """The export's spiece.model is the source file, so data.tokenizer=<run>/hf trains the same ids."""
    assert (export / "spiece.model").read_bytes() == SPIECE.read_bytes()
    assert build_tokenizer(DataConfig(tokenizer=str(export))).encode(TEXTS) == reference_ids(TEXTS)


def test_stale_tokenizer_files_in_the_directory_are_replaced(tmp_path, export):
    from transformers import AutoTokenizer

    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 100}))
    export_tokenizer(build_tokenizer(DataConfig(tokenizer=str(SPIECE))), tmp_path)
    assert AutoTokenizer.from_pretrained(str(tmp_path))(TEXTS)["input_ids"] == reference_ids(TEXTS)


def test_a_conversion_that_changes_the_ids_is_refused(tmp_path, monkeypatch):
    """Guards the transformers 5.x pitfall: a silently rebuilt vocabulary must not be exported."""
    import transformers

    real = transformers.T5TokenizerFast

    class Broken:
        @staticmethod
        def from_pretrained(directory, **kwargs):
            return real(vocab_file=str(Path(directory) / "spiece.model"), **kwargs)  # 5.x ignores vocab_file

    monkeypatch.setattr(transformers, "T5TokenizerFast", Broken)
    with pytest.raises(DataError, match="converted tokenizer .*spiece.model into a different one"):
        export_tokenizer(build_tokenizer(DataConfig(tokenizer=str(SPIECE))), tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
