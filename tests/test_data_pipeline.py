"""Train stream and validation batches on tiny C4-format shards written by the tests.

Expected values come from tokenizing each document on its own (and, for the papers' padding, from
`transformers`' T5Tokenizer as the reference), never from the pipeline's own output.
"""
from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import data
from data import DataConfig, DataError, build_tokenizer, build_train_loader, build_val_batches

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when what if more "
    "river city music history language science water mountain king school war island"
).split()


def make_documents(n: int, seed: int, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))).capitalize() + "."
            for _ in range(n)]


def write_shard(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


def records(texts: list[str]) -> list[str]:
    return [json.dumps({"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{i}"})
            for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def tokenizer() -> data.Tokenizer:
    return build_tokenizer(DataConfig())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[list[str]], list[str]]:
    """Three train shards (documents per shard) and one validation shard."""
    root = tmp_path_factory.mktemp("c4")
    shards = [make_documents(n, seed=s) for s, n in enumerate((23, 17, 30))]
    for i, texts in enumerate(shards):
        write_shard(root / "en" / f"c4-train.{i:05d}-of-00003.json.gz", records(texts))
    validation = make_documents(40, seed=99)
    write_shard(root / "en" / "c4-validation.00000-of-00001.json.gz", records(validation))
    return root, shards, validation


def config(root: Path | None, **overrides) -> DataConfig:
    base = DataConfig(name="test", path=None if root is None else str(root), seq_len=16, shuffle_buffer=7, val_tokens=300)
    return replace(base, **overrides)


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def global_batches(cfg: DataConfig, tokenizer, world_size: int, global_batch: int, steps: int) -> list[torch.Tensor]:
    """Input ids of each global batch, assembled from every rank's micro-batch in rank order."""
    micro = global_batch // world_size
    per_rank = [take(build_train_loader(cfg, tokenizer, rank=r, world_size=world_size, micro_batch_size=micro), steps)
                for r in range(world_size)]
    return [torch.cat([per_rank[r][k]["input_ids"] for r in range(world_size)]) for k in range(steps)]


def test_packing_loses_no_token_and_pads_nothing(corpus, tokenizer):
    root, shards, _ = corpus
    cfg = config(root, shuffle=False)
    expected = [t for texts in shards for ids in tokenizer.encode(texts) for t in ids]
    n_rows = len(expected) // cfg.seq_len + 3  # run past the end of the epoch
    batches = take(build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=1), n_rows)
    stream = torch.cat([b["input_ids"][0] for b in batches]).tolist()
    assert stream[: len(expected)] == expected
    assert stream[len(expected):] == expected[: len(stream) - len(expected)]  # next epoch starts over
    for b in batches:
        assert torch.equal(b["labels"], b["input_ids"])


def split_at_eos(tokens: list[int], eos: int) -> list[tuple[int, ...]]:
    documents, current = [], []
    for t in tokens:
        current.append(t)
        if t == eos:
            documents.append(tuple(current))
            current = []
    return documents


def test_shuffled_epochs_are_permutations_of_the_documents(corpus, tokenizer):
    root, shards, _ = corpus
    cfg = config(root)
    expected_documents = [tuple(ids) for texts in shards for ids in tokenizer.encode(texts)]
    total = sum(len(d) for d in expected_documents)
    n_rows = 2 * total // cfg.seq_len + 2
    batches = take(build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=1), n_rows)
    stream = torch.cat([b["input_ids"][0] for b in batches]).tolist()
    first, second = stream[:total], stream[total: 2 * total]
    for epoch in (first, second):
        assert Counter(split_at_eos(epoch, tokenizer.eos_id)) == Counter(expected_documents)
    file_order = [t for d in expected_documents for t in d]
    assert first != file_order and second != first


def test_each_epoch_reshuffles_the_documents_within_a_shard(tmp_path, tokenizer):
    texts = make_documents(20, seed=3, max_words=12)
    write_shard(tmp_path / "en" / "c4-train.00000-of-00001.json.gz", records(texts))
    cfg = config(tmp_path, packing=False, shuffle_buffer=100, seq_len=64)
    document_ids = {tuple(ids): i for i, ids in enumerate(tokenizer.encode(texts))}
    assert len(document_ids) == 20 and max(len(ids) for ids in document_ids) < 64
    loader = build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=1)
    order = []
    for batch in take(loader, 40):
        row = batch["input_ids"][0][batch["labels"][0] != -100].tolist()
        order.append(document_ids[tuple(row)])
    first, second = order[:20], order[20:]
    assert sorted(first) == sorted(second) == list(range(20))
    assert first != list(range(20)) and second != first


def test_paper_mode_truncates_and_pads_like_the_t5_tokenizer(tmp_path, tokenizer):
    from transformers import T5Tokenizer

    texts = ["Short one.", "A b c d e f g h i j k l m n o p q r s t u v w x y z and more words.",
             "Exactly sized?", "The river city had music."]
    write_shard(tmp_path / "en" / "c4-train.00000-of-00001.json.gz", records(texts))
    cfg = config(tmp_path, packing=False, shuffle=False, seq_len=12)
    batch = next(build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=4))

    reference = T5Tokenizer.from_pretrained(str(data.config.REPO_ROOT / "data/sample/tokenizer"), extra_ids=0, legacy=False)
    expected = reference(texts, truncation=True, max_length=12, padding="max_length")
    assert batch["input_ids"].tolist() == expected["input_ids"]
    mask = torch.tensor(expected["attention_mask"]).bool()
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    assert (batch["labels"][~mask] == -100).all() and (batch["input_ids"][~mask] == 0).all()

    encoded = tokenizer.encode(texts)  # the same semantics spelled out by hand
    long_row = encoded[1]
    assert len(long_row) > 12 and batch["input_ids"][1].tolist() == long_row[:11] + [tokenizer.eos_id]
    short = encoded[0]
    assert batch["input_ids"][0].tolist() == short + [0] * (12 - len(short))


@pytest.mark.parametrize("packing", [True, False])
def test_global_batches_do_not_depend_on_world_size(corpus, tokenizer, packing):
    root, _, _ = corpus
    cfg = config(root, packing=packing)
    steps = 12  # crosses an epoch boundary
    reference = global_batches(cfg, tokenizer, world_size=1, global_batch=6, steps=steps)
    for world_size in (2, 3):
        batches = global_batches(cfg, tokenizer, world_size=world_size, global_batch=6, steps=steps)
        assert all(torch.equal(a, b) for a, b in zip(reference, batches))
    assert not torch.equal(reference[0], reference[1])


def test_workers_produce_the_same_stream(corpus, tokenizer):
    root, _, _ = corpus
    serial = take(build_train_loader(config(root), tokenizer, rank=1, world_size=2, micro_batch_size=2), 9)
    workers = take(build_train_loader(config(root, num_workers=2), tokenizer, rank=1, world_size=2, micro_batch_size=2), 9)
    for a, b in zip(serial, workers):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


@pytest.mark.parametrize("packing,num_workers", [(True, 0), (False, 0), (True, 2)])
def test_resume_yields_exactly_the_uninterrupted_batches(corpus, tokenizer, packing, num_workers):
    root, _, _ = corpus
    cfg = config(root, packing=packing, num_workers=num_workers)
    uninterrupted = take(build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=3), 14)
    for stop in (1, 5, 9):
        first = build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=3)
        take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint round trip allows
        resumed = build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=3)
        resumed.load_state_dict(state)
        for expected, got in zip(uninterrupted[stop:], take(resumed, 14 - stop)):
            assert torch.equal(expected["input_ids"], got["input_ids"])
            assert torch.equal(expected["labels"], got["labels"])


def test_a_saved_state_resumes_any_rank_and_world_size(corpus, tokenizer):
    root, _, _ = corpus
    cfg = config(root)
    two_ranks = [build_train_loader(cfg, tokenizer, rank=r, world_size=2, micro_batch_size=2) for r in range(2)]
    for loader in two_ranks:
        take(loader, 4)
    state = two_ranks[0].state_dict()
    assert state == two_ranks[1].state_dict()
    expected = torch.cat([next(loader)["input_ids"] for loader in two_ranks])
    single = build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=4)
    single.load_state_dict(state)
    assert torch.equal(next(single)["input_ids"], expected)


def test_resume_rejects_changed_settings(corpus, tokenizer):
    root, _, _ = corpus
    loader = build_train_loader(config(root), tokenizer, rank=0, world_size=1, micro_batch_size=2)
    take(loader, 2)
    changed = build_train_loader(config(root, seq_len=32), tokenizer, rank=0, world_size=1, micro_batch_size=2)
    with pytest.raises(DataError, match="seq_len: saved 16, now 32"):
        changed.load_state_dict(loader.state_dict())


def test_corrupt_lines_are_skipped_counted_and_resumed(tmp_path, tokenizer):
    texts = make_documents(12, seed=5)
    lines = records(texts)
    lines[2] = '{"text": "broken json'
    lines[5] = json.dumps({"url": "no text"})
    lines[9] = json.dumps(["not", "a", "record"])
    write_shard(tmp_path / "en" / "c4-train.00000-of-00001.json.gz", lines)
    cfg = config(tmp_path, shuffle=False)
    valid = [t for i, t in enumerate(texts) if i not in (2, 5, 9)]
    expected = [t for ids in tokenizer.encode(valid) for t in ids]
    n_rows = len(expected) // cfg.seq_len
    loader = build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=1)
    stream = torch.cat([b["input_ids"][0] for b in take(loader, n_rows)]).tolist()
    assert stream == expected[: len(stream)]
    assert loader.skipped_lines == 3 and loader.stats() == {"skipped_lines": 3}
    resumed = build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=1)
    resumed.load_state_dict(loader.state_dict())
    assert resumed.skipped_lines == 3
    take(resumed, n_rows)  # the whole second epoch meets the three lines again
    assert resumed.skipped_lines == 6


def test_truncated_gzip_names_the_file(tmp_path, tokenizer):
    path = tmp_path / "en" / "c4-train.00000-of-00001.json.gz"
    write_shard(path, records(make_documents(200, seed=1)))
    path.write_bytes(path.read_bytes()[:-200])
    loader = build_train_loader(config(tmp_path), tokenizer, rank=0, world_size=1, micro_batch_size=1)
    with pytest.raises(DataError, match=r"c4-train\.00000-of-00001\.json\.gz is truncated or not a valid gzip"):
        take(loader, 10_000)


def test_missing_directory_and_missing_shards(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"data directory .*nowhere does not exist.*data=sample"):
        build_train_loader(config(tmp_path / "nowhere"), tokenizer, rank=0, world_size=1, micro_batch_size=1)
    (tmp_path / "en").mkdir()
    with pytest.raises(DataError, match=r"has no train shards matching en/c4-train\.\*\.json\.gz"):
        build_train_loader(config(tmp_path), tokenizer, rank=0, world_size=1, micro_batch_size=1)
    with pytest.raises(DataError, match="has no validation shards"):
        build_val_batches(config(tmp_path), tokenizer, rank=0, world_size=1, micro_batch_size=1)


def test_a_shard_without_any_valid_document(tmp_path, tokenizer):
    write_shard(tmp_path / "en" / "c4-train.00000-of-00001.json.gz", ["not json", "{}"])
    loader = build_train_loader(config(tmp_path), tokenizer, rank=0, world_size=1, micro_batch_size=1)
    with pytest.raises(DataError, match="no valid documents"):
        next(loader)


def test_unreachable_hub_says_what_to_do(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"Hub is unreachable.*en/c4-train\.\*\.json\.gz.*data\.path.*data=sample"):
        build_train_loader(DataConfig(path=None), tokenizer, rank=0, world_size=1, micro_batch_size=1)

    def no_cache(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_cache)
    with pytest.raises(DataError, match=r"Hub is unreachable.*tokenizer 't5-base'.*spiece\.model"):
        build_tokenizer(DataConfig(tokenizer="t5-base"))


def test_hub_streaming_path_matches_local_shards(corpus, tokenizer, monkeypatch):
    """The hub branch, fed by a local json streaming dataset instead of allenai/c4."""
    import datasets

    root, _, _ = corpus
    real_load_dataset = datasets.load_dataset
    calls = []

    def local_hub(hub_id, hub_config, *, split, streaming):
        calls.append((hub_id, hub_config, split, streaming))
        pattern = "c4-train.*.json.gz" if split == "train" else "c4-validation.*.json.gz"
        files = [str(p) for p in sorted((root / "en").glob(pattern))]
        return real_load_dataset("json", data_files=files, split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", local_hub)
    hub_cfg = config(None)
    assert hub_cfg.path is None
    hub_batches = take(build_train_loader(hub_cfg, tokenizer, rank=0, world_size=1, micro_batch_size=3), 8)
    local_batches = take(build_train_loader(config(root), tokenizer, rank=0, world_size=1, micro_batch_size=3), 8)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(hub_batches, local_batches))
    hub_val = build_val_batches(hub_cfg, tokenizer, rank=0, world_size=1, micro_batch_size=4)
    local_val = build_val_batches(config(root), tokenizer, rank=0, world_size=1, micro_batch_size=4)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(hub_val, local_val))
    assert calls[0] == ("allenai/c4", "en", "train", True) and calls[-1][2] == "validation"


def target_rows(batches: list[dict[str, torch.Tensor]]) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for b in batches for row in b["labels"] if (row != -100).any()]


@pytest.mark.parametrize("packing", [True, False])
def test_validation_rows_do_not_depend_on_world_or_batch_size(corpus, tokenizer, packing):
    root, _, validation = corpus
    cfg = config(root, packing=packing)
    encoded = tokenizer.encode(validation)
    if packing:  # first ceil(300 / 16) = 19 rows of the file-order token stream
        stream = [t for ids in encoded for t in ids]
        expected_rows = [tuple(stream[i * 16:(i + 1) * 16]) for i in range(19)]
    else:  # documents until 300 target tokens are reached
        expected_rows, kept = [], 0
        for ids in encoded:
            ids = ids if len(ids) <= 16 else ids[:15] + [tokenizer.eos_id]
            expected_rows.append(tuple(ids + [-100] * (16 - len(ids))))
            kept += len(ids)
            if kept >= 300:
                break
    for world_size in (1, 2, 3):
        for micro in (1, 4, 7):
            per_rank = [build_val_batches(cfg, tokenizer, rank=r, world_size=world_size, micro_batch_size=micro)
                        for r in range(world_size)]
            assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of batches
            rows = [row for batches in per_rank for row in target_rows(batches)]
            assert Counter(rows) == Counter(expected_rows)
            for batches in per_rank:
                for b in batches:
                    padding_rows = (b["labels"] == -100).all(dim=1)
                    assert (b["input_ids"][padding_rows] == tokenizer.pad_id).all()
                    assert b["input_ids"].shape == (micro, 16)


def test_validation_with_a_small_split_uses_all_of_it(corpus, tokenizer, caplog):
    root, _, validation = corpus
    cfg = config(root, val_tokens=10**9)
    batches = build_val_batches(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=4)
    total = sum(len(ids) for ids in tokenizer.encode(validation))
    assert sum(int((b["labels"] != -100).sum()) for b in batches) == total // 16 * 16
    assert "validation split exhausted" in caplog.text
