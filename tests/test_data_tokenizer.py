"""Tokenizer id layout and errors, the bundled sample corpus, and the `data` config group."""
from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import data
from data import DataConfig, DataError, build_tokenizer, build_train_loader, build_val_batches

REPO = Path(data.__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
ENGLISH = (
    "The river flows through the old city, past the school and the market. In the winter the water "
    "freezes, and children skate on it while their parents watch from the bridge."
)


@pytest.fixture(scope="module")
def tokenizer() -> data.Tokenizer:
    return build_tokenizer(DataConfig())


def test_t5_id_layout(tokenizer):
    processor = spm.SentencePieceProcessor(model_file=str(SAMPLE / "tokenizer" / "spiece.model"))
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)
    assert [processor.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert processor.bos_id() == -1
    assert tokenizer.vocab_size == processor.get_piece_size() == 8192


def test_encode_appends_eos_and_real_text_is_mostly_known(tokenizer):
    ids = tokenizer.encode([ENGLISH, ""])
    assert ids[1] == [tokenizer.eos_id]
    assert ids[0][-1] == tokenizer.eos_id and tokenizer.eos_id not in ids[0][:-1]
    assert tokenizer.pad_id not in ids[0]
    assert len(ids[0]) < len(ENGLISH.split()) * 2  # whole words, not characters
    with gzip.open(SAMPLE / "en" / "c4-validation.00000-of-00001.json.gz", "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    tokens = [t for row in tokenizer.encode(texts) for t in row]
    assert sum(t == tokenizer.unk_id for t in tokens) / len(tokens) < 0.002
    assert tokenizer.decode(ids[0]) == ENGLISH
    assert tokenizer.decode(ids) == [ENGLISH, ""]


def test_tokenizer_pickles_for_spawned_workers(tokenizer):
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.encode([ENGLISH]) == tokenizer.encode([ENGLISH]) and copy.vocab_size == tokenizer.vocab_size


def test_tokenizer_sources(tmp_path, tokenizer):
    model_file = SAMPLE / "tokenizer" / "spiece.model"
    for value in (str(model_file), str(model_file.parent), "data/sample/tokenizer/spiece.model"):
        assert build_tokenizer(DataConfig(tokenizer=value)).encode([ENGLISH]) == tokenizer.encode([ENGLISH])
    with pytest.raises(DataError, match=r"tokenizer file .*missing\.model not found"):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path / "missing.model")))
    with pytest.raises(DataError, match=r"tokenizer file .*spiece\.model not found"):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path)))


@pytest.mark.parametrize("content", [
    random.Random(0).randbytes(4096),
    ENGLISH.encode(),
    b"",
    (SAMPLE / "tokenizer" / "spiece.model").read_bytes()[:5000],  # a truncated download
], ids=["random-bytes", "text", "empty", "truncated"])
def test_a_file_that_is_no_sentencepiece_model_is_one_clear_error(tmp_path, content):
    (tmp_path / "spiece.model").write_bytes(content)
    for value in (str(tmp_path / "spiece.model"), str(tmp_path)):
        with pytest.raises(DataError) as error:
            build_tokenizer(DataConfig(tokenizer=value))
        message = str(error.value)
        assert message.startswith(f"data.tokenizer={value!r}: ")
        assert f"tokenizer file {tmp_path / 'spiece.model'} is not a SentencePiece model" in message
        assert "\n" not in message and error.value.__cause__ is None


def test_tokenizer_with_another_id_layout_is_refused(tmp_path):
    sentences = [ENGLISH] * 50 + ["Another sentence about water and cities."] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=str(tmp_path / "llama"),
                                   vocab_size=60, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    with pytest.raises(DataError, match=r"needs T5's layout"):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path / "llama.model")))


def test_bundled_sample_corpus_is_c4_formatted_and_matches_its_readme():
    readme = (SAMPLE / "README.md").read_text()
    listed = dict((path, digest) for digest, path in re.findall(r"([0-9a-f]{64})\s+`?([\w./-]+)`?", readme))
    files = sorted(p for p in SAMPLE.rglob("*") if p.is_file() and p.name != "README.md")
    assert {str(p.relative_to(SAMPLE)) for p in files} == set(listed)
    for path in files:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == listed[str(path.relative_to(SAMPLE))]
    assert sum(p.stat().st_size for p in files) < 5_000_000
    counts = {}
    for split in ("train", "validation"):
        with gzip.open(SAMPLE / "en" / f"c4-{split}.00000-of-00001.json.gz", "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        assert all(set(r) == {"text", "timestamp", "url"} and r["text"].strip() for r in records)
        counts[split] = {r["url"] for r in records}
    assert not counts["train"] & counts["validation"]  # held-out articles, not held-out paragraphs
    assert len(counts["validation"]) >= 10


def test_sample_config_trains_and_validates(tokenizer):
    cfg = DataConfig()
    batch = next(build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=4))
    assert batch["input_ids"].shape == batch["targets"].shape == (4, 256)
    assert batch["input_ids"].dtype == batch["targets"].dtype == torch.long
    assert int(batch["input_ids"].max()) < tokenizer.vocab_size and (batch["targets"] != -100).all()
    budget = compose_data("sample").val_tokens
    for packing in (True, False):  # sample.yaml's budget fits the held-out split in both modes
        val_cfg = replace(cfg, packing=packing, val_tokens=budget)
        batches = build_val_batches(val_cfg, tokenizer, rank=0, world_size=1, micro_batch_size=16)
        assert sum(int((b["targets"] != -100).sum()) for b in batches) >= budget


def compose_data(name: str, overrides: list[str] = (), config_dir: Path = REPO / "configs"):
    """The `data` group as train.py composes it (no primary config needed)."""
    data.register_configs(ConfigStore.instance())
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(overrides=[f"+data={name}", *overrides]).data


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs" / "data").glob("*.yaml")))
def test_every_data_yaml_composes_against_the_schema(name):
    cfg = compose_data(name)
    typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg))
    assert isinstance(typed, DataConfig) and typed.name == name


def test_typos_and_wrong_types_fail_with_hydra_messages(tmp_path):
    with pytest.raises(ConfigCompositionException, match="seq_lenn"):
        compose_data("sample", ["data.seq_lenn=128"])
    with pytest.raises(ConfigCompositionException, match="seq_len"):
        compose_data("sample", ["data.seq_len=long"])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "typo.yaml").write_text("defaults:\n  - data_schema\n  - _self_\n\nname: typo\npackign: false\n")
    with pytest.raises(ConfigCompositionException, match="packign"):
        compose_data("typo", config_dir=tmp_path)


def test_relative_paths_resolve_against_the_repo_root(tmp_path, monkeypatch, tokenizer):
    monkeypatch.chdir(tmp_path)
    cfg = replace(DataConfig(), path="data/sample", tokenizer="data/sample/tokenizer")
    assert build_tokenizer(cfg).vocab_size == tokenizer.vocab_size
    assert next(build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=1))["input_ids"].shape == (1, 256)
