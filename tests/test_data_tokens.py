"""Prepared token files (scripts/prepare_data.py, `data=tokens`) on tiny C4-format shards.

References are independent of the pipeline: token files are compared with sentencepiece's own
encoding of each document plus EOS, and the row order with numpy's seeded permutation written out
from the documented formula.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from data import DataConfig, DataError, build_tokenizer, build_train_loader, build_val_batches
from data.config import REPO_ROOT
from data.prepare import prepare
from test_data_pipeline import assert_same_batches, global_batches, make_documents, records, reference_ids, take, write_shard

SAMPLE_TOKENIZER = REPO_ROOT / "data/sample/tokenizer/spiece.model"
ALL_SHARDS = {"train": None, "validation": None}


def run_prepare(text_root: Path, output: Path, workers: int = 2) -> dict:
    cfg = DataConfig(name="test", path=str(text_root), tokenizer=str(SAMPLE_TOKENIZER))
    return prepare(cfg, output, workers=workers, shards=ALL_SHARDS, console=Console(quiet=True))


def tokens_config(prepared: Path, **overrides) -> DataConfig:
    base = DataConfig(name="tokens", format="tokens", path=str(prepared), tokenizer=None, seq_len=16, val_tokens=300)
    return replace(base, **overrides)


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory) -> tuple[Path, list[list[str]], list[str]]:
    """Three train shards, one with two corrupt lines, and one validation shard."""
    root = tmp_path_factory.mktemp("c4")
    shards = [make_documents(n, seed=10 + s) for s, n in enumerate((23, 17, 30))]
    for i, texts in enumerate(shards):
        lines = records(texts)
        if i == 1:
            lines[3:3] = ['{"text": "broken', json.dumps({"url": "no text"})]
        write_shard(root / "en" / f"c4-train.{i:05d}-of-00003.json.gz", lines)
    validation = make_documents(40, seed=98)
    write_shard(root / "en" / "c4-validation.00000-of-00001.json.gz", records(validation))
    return root, shards, validation


@pytest.fixture(scope="module")
def prepared(text_corpus, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("tokens")
    run_prepare(text_corpus[0], output)
    return output


@pytest.fixture(scope="module")
def tokenizer(prepared):
    return build_tokenizer(tokens_config(prepared))


def test_prepared_files_hold_each_documents_ids_and_eos(text_corpus, prepared):
    _, shards, validation = text_corpus
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(SAMPLE_TOKENIZER.read_bytes()).hexdigest()
    assert (prepared / "spiece.model").read_bytes() == SAMPLE_TOKENIZER.read_bytes()
    for split, documents in (("train", shards), ("validation", [validation])):
        entry = manifest["splits"][split]
        assert len(entry["shards"]) == len(documents)
        for shard, texts in zip(entry["shards"], documents):
            expected = [t for ids in reference_ids(texts) for t in ids]
            stored = np.fromfile(prepared / shard["file"], dtype="<u2")
            assert stored.tolist() == expected
            assert (shard["documents"], shard["tokens"]) == (len(texts), len(expected))
        assert entry["tokens"] == sum(s["tokens"] for s in entry["shards"])
    assert [s["skipped_lines"] for s in manifest["splits"]["train"]["shards"]] == [0, 2, 0]
    assert manifest["splits"]["train"]["documents"] == 70


def test_rows_in_file_order_are_the_packed_windows_of_the_text_stream(text_corpus, prepared, tokenizer):
    text_root, shards, _ = text_corpus
    stream = [t for texts in shards for ids in reference_ids(texts) for t in ids]
    n_windows = (len(stream) - 1) // 16
    loader = build_train_loader(tokens_config(prepared, shuffle=False), tokenizer, rank=0, world_size=1, micro_batch_size=1)
    rows = take(loader, n_windows)
    for k, row in enumerate(rows):
        assert row["input_ids"][0].tolist() == stream[16 * k: 16 * k + 16]
        assert row["targets"][0].tolist() == stream[16 * k + 1: 16 * k + 17]
        assert row["input_ids"].dtype == row["targets"].dtype == torch.int64
    text = build_train_loader(DataConfig(name="t", path=str(text_root), tokenizer=str(SAMPLE_TOKENIZER), seq_len=16,
                                         shuffle=False), tokenizer, rank=0, world_size=1, micro_batch_size=1)
    assert_same_batches(rows, take(text, n_windows))  # the first epoch is the text pipeline's, row for row
    assert next(loader)["input_ids"][0].tolist() == stream[:16]  # the next epoch starts again at token 0


def test_each_epoch_is_the_seeded_permutation_of_the_windows(text_corpus, prepared, tokenizer):
    _, shards, _ = text_corpus
    stream = np.array([t for texts in shards for ids in reference_ids(texts) for t in ids])
    n_windows = (len(stream) - 1) // 16
    cfg = tokens_config(prepared, seed=7)
    batches = take(build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=5), 2 * n_windows // 5 + 3)
    inputs = torch.cat([b["input_ids"] for b in batches]).numpy()
    for g, row in enumerate(inputs):
        epoch, k = divmod(g, n_windows)
        window = np.random.default_rng([7, epoch]).permutation(n_windows)[k]
        assert row.tolist() == stream[16 * window: 16 * window + 16].tolist()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_global_batches_do_not_depend_on_ranks_or_workers(prepared, tokenizer, num_workers):
    cfg = tokens_config(prepared, num_workers=num_workers)
    reference = global_batches(tokens_config(prepared), tokenizer, world_size=1, global_batch=6, steps=30)
    for world_size in (2, 3):
        assert_same_batches(reference, global_batches(cfg, tokenizer, world_size=world_size, global_batch=6, steps=30))


def test_resume_is_exact_and_needs_only_the_position(prepared, tokenizer):
    cfg = tokens_config(prepared, num_workers=2)
    uninterrupted = take(build_train_loader(cfg, tokenizer, rank=1, world_size=2, micro_batch_size=3), 14)
    first = build_train_loader(cfg, tokenizer, rank=1, world_size=2, micro_batch_size=3)
    take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["rows"] == 30
    resumed = build_train_loader(replace(cfg, num_workers=0), tokenizer, rank=1, world_size=2, micro_batch_size=3)
    resumed.load_state_dict(state)
    assert_same_batches(uninterrupted[5:], take(resumed, 9))

    # O(1): a position a trillion rows on is as quick to resume as any, and yields the formula's rows.
    far = build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=2)
    state["rows"] = 10**12
    start = time.perf_counter()
    far.load_state_dict(state)
    batch = next(far)
    assert time.perf_counter() - start < 30
    n_windows = (json.loads((prepared / "manifest.json").read_text())["splits"]["train"]["tokens"] - 1) // 16
    epoch, k = divmod(10**12, n_windows)
    window = np.random.default_rng([42, epoch]).permutation(n_windows)[k]
    stream = np.concatenate([np.fromfile(f, dtype="<u2") for f in sorted((prepared / "train").glob("*.bin"))])
    assert batch["input_ids"][0].tolist() == stream[16 * window: 16 * window + 16].tolist()


def test_resume_refuses_other_data_or_settings(prepared, tokenizer):
    loader = build_train_loader(tokens_config(prepared), tokenizer, rank=0, world_size=1, micro_batch_size=2)
    take(loader, 2)
    changed = build_train_loader(tokens_config(prepared, seed=1), tokenizer, rank=0, world_size=1, micro_batch_size=2)
    with pytest.raises(DataError, match="seed: saved 42, now 1"):
        changed.load_state_dict(loader.state_dict())
    other_batch = build_train_loader(tokens_config(prepared), tokenizer, rank=0, world_size=1, micro_batch_size=3)
    with pytest.raises(DataError, match="not at a global batch boundary"):
        other_batch.load_state_dict(loader.state_dict())


def test_validation_rows_are_the_text_pipelines(text_corpus, prepared, tokenizer):
    text_cfg = DataConfig(name="t", path=str(text_corpus[0]), tokenizer=str(SAMPLE_TOKENIZER), seq_len=16, val_tokens=300)
    for world_size, micro in ((1, 4), (2, 3)):
        for rank in range(world_size):
            expected = build_val_batches(text_cfg, tokenizer, rank=rank, world_size=world_size, micro_batch_size=micro)
            got = build_val_batches(tokens_config(prepared), tokenizer, rank=rank, world_size=world_size, micro_batch_size=micro)
            assert_same_batches(expected, got)


def other_tokenizer(path: Path) -> Path:
    """The sample tokenizer with one metadata field changed: the same ids, other bytes."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(SAMPLE_TOKENIZER.read_bytes())
    model.trainer_spec.model_prefix = "another"
    path.write_bytes(model.SerializeToString())
    return path


def test_a_tokenizer_other_than_the_manifests_is_refused(prepared, tmp_path):
    cfg = tokens_config(prepared, tokenizer=str(other_tokenizer(tmp_path / "other.model")))
    tokenizer = build_tokenizer(cfg)
    message = rf"data.tokenizer='.*other.model' .* is not the tokenizer {prepared}/manifest.json was prepared with"
    with pytest.raises(DataError, match=message):
        build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=1)
    with pytest.raises(DataError, match=message):
        build_val_batches(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=1)
    same = tokens_config(prepared, tokenizer=str(SAMPLE_TOKENIZER))  # the same file elsewhere is accepted
    next(build_train_loader(same, build_tokenizer(same), rank=0, world_size=1, micro_batch_size=1))


def test_a_missing_or_unfinished_directory_is_one_clear_error(prepared, tokenizer, tmp_path):
    def error(cfg) -> str:
        with pytest.raises(DataError) as info:
            build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=1)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "data=tokens needs data.path" in error(tokens_config(prepared, path=None))
    assert "does not exist" in error(tokens_config(tmp_path / "nowhere"))
    copy = shutil.copytree(prepared, tmp_path / "copy")
    (copy / "manifest.json").unlink()
    assert "has no manifest.json, so its preparation never finished" in error(tokens_config(copy))
    (copy / "spiece.model").unlink()
    with pytest.raises(DataError, match="has no manifest.json"):  # reported before the missing tokenizer copy
        build_tokenizer(tokens_config(copy))
    shutil.copy(prepared / "manifest.json", copy / "manifest.json")
    with open(copy / "train" / "00001.bin", "r+b") as file:
        file.truncate(10)
    assert "00001.bin is 10 bytes but" in error(tokens_config(copy))
    assert "packed rows only" in error(tokens_config(prepared, packing=False))


def test_a_failed_preparation_resumes_to_the_uninterrupted_result(text_corpus, tmp_path):
    """A truncated shard makes its worker raise; after the fix a rerun tokenizes only that shard."""
    text_root = shutil.copytree(text_corpus[0], tmp_path / "c4")
    broken = text_root / "en" / "c4-train.00001-of-00003.json.gz"
    good = broken.read_bytes()
    broken.write_bytes(good[:-40])
    output = tmp_path / "tokens"
    with pytest.raises(DataError, match=r"c4-train\.00001-of-00003\.json\.gz is truncated"):
        run_prepare(text_root, output)
    assert not (output / "manifest.json").exists() and not (output / "train" / "00001.json").exists()
    finished = {p.relative_to(output): p.stat().st_mtime_ns for p in output.glob("*/*.json")}
    assert Path("train/00000.json") in finished  # it ran beside the failing shard and was finished

    broken.write_bytes(good)
    result = run_prepare(text_root, output)
    assert result["run"]["shards"] == 4 - len(finished)
    assert all((output / name).stat().st_mtime_ns == mtime for name, mtime in finished.items())
    run_prepare(text_root, tmp_path / "uninterrupted")
    assert_same_directories(output, tmp_path / "uninterrupted")


def assert_same_directories(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_killed_preparation_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL to the CLI and its workers after the first shard landed, then the same command again."""
    text_root = tmp_path / "c4"
    sample = REPO_ROOT / "data/sample/en"
    with gzip.open(sample / "c4-train.00000-of-00001.json.gz", "rt", encoding="utf-8") as file:
        lines = file.read().splitlines()
    for i in range(4):  # the sample's train split cut into four shards of about 160k tokens
        write_shard(text_root / "en" / f"c4-train.{i:05d}-of-00004.json.gz", lines[i::4])
    shutil.copy(sample / "c4-validation.00000-of-00001.json.gz", text_root / "en")
    output = tmp_path / "tokens"
    command = [sys.executable, str(REPO_ROOT / "scripts/prepare_data.py"), "data=sample", f"data.path={text_root}",
               f"output={output}", "--workers", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (output / "train" / "00000.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    records_done = sorted(p.name for p in (output / "train").glob("*.json"))
    assert not (output / "manifest.json").exists() and 1 <= len(records_done) < 4
    for record in records_done:  # what looks finished is finished
        entry = json.loads((output / "train" / record).read_text())
        assert (output / entry["file"]).stat().st_size == 2 * entry["tokens"]

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"of {5 - len(records_done)} shard(s)" in rerun.stdout
    assert "data=tokens" in rerun.stdout
    reference = tmp_path / "reference"
    prepare(DataConfig(name="sample", path=str(text_root)), reference, workers=2, shards=ALL_SHARDS,
            console=Console(quiet=True))
    assert_same_directories(output, reference)


def test_the_hub_branch_prepares_the_same_tokens(text_corpus, prepared, tmp_path, monkeypatch):
    """`data=c4` without a path streams allenai/c4; here a local json streaming dataset stands in for it."""
    import datasets

    root = text_corpus[0]
    real_load_dataset = datasets.load_dataset
    calls = []

    def local_hub(hub_id, hub_config, *, split, streaming):
        calls.append((hub_id, hub_config, split, streaming))
        files = [str(p) for p in sorted((root / "en").glob(f"c4-{split}.*.json.gz"))]
        return real_load_dataset("json", data_files=files, split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", local_hub)  # worker processes are forked with it
    cfg = DataConfig(name="c4", path=None, tokenizer=str(SAMPLE_TOKENIZER))
    # train_shards=1: the first shard only (the json builder would stop at shard 1's corrupt lines)
    manifest = prepare(cfg, tmp_path, workers=2, shards={"train": 1, "validation": None}, console=Console(quiet=True))
    assert calls[0] == ("allenai/c4", "en", "train", True) and manifest["source"] == "allenai/c4/en"
    assert [s["name"] for s in manifest["splits"]["train"]["shards"]] == ["allenai/c4/en/train#0"]
    for split in ("train", "validation"):
        assert (tmp_path / split / "00000.bin").read_bytes() == (prepared / split / "00000.bin").read_bytes()
