"""Train stream and validation batches on tiny C4-format shards written by the tests.

Expected values come from tokenizing each document on its own with sentencepiece (and, for the
papers' padding, from `transformers`' T5Tokenizer and the model's own `labels=` loss as the
references), never from the pipeline's own output.
"""
from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

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


def reference_ids(texts: list[str]) -> list[list[int]]:
    """Each document as sentencepiece encodes it, followed by EOS (id 1), as training sees it."""
    processor = spm.SentencePieceProcessor(model_file=str(data.config.REPO_ROOT / "data/sample/tokenizer/spiece.model"))
    return [ids + [1] for ids in processor.encode(texts)]


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


def global_batches(cfg: DataConfig, tokenizer, world_size: int, global_batch: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """Each global batch, assembled from every rank's micro-batch in rank order."""
    micro = global_batch // world_size
    per_rank = [take(build_train_loader(cfg, tokenizer, rank=r, world_size=world_size, micro_batch_size=micro), steps)
                for r in range(world_size)]
    return [{key: torch.cat([per_rank[r][k][key] for r in range(world_size)]) for key in ("input_ids", "targets")}
            for k in range(steps)]


def assert_same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y) == {"input_ids", "targets"}
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["targets"], y["targets"])


@pytest.mark.parametrize("world_size,micro", [(1, 1), (2, 3)])
def test_packed_targets_are_the_token_stream_minus_its_first_token(corpus, tokenizer, world_size, micro):
    root, shards, _ = corpus
    cfg = config(root, shuffle=False)
    epoch = [t for texts in shards for ids in reference_ids(texts) for t in ids]
    stream = epoch * 3
    steps = len(epoch) // (cfg.seq_len * world_size * micro) + 2  # run past the end of the first epoch
    batches = global_batches(cfg, tokenizer, world_size, world_size * micro, steps)
    n_targets = steps * world_size * micro * cfg.seq_len
    assert len(stream) > n_targets + 1 > len(epoch)
    inputs = torch.cat([b["input_ids"] for b in batches]).flatten().tolist()
    targets = torch.cat([b["targets"] for b in batches]).flatten().tolist()
    assert targets == stream[1: n_targets + 1]  # every token but the first, each exactly once
    assert inputs == stream[:n_targets]
    for b in batches:
        assert b["input_ids"].dtype == b["targets"].dtype == torch.int64
        assert b["input_ids"].shape == b["targets"].shape == (world_size * micro, cfg.seq_len)


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
        row = batch["input_ids"][0][batch["input_ids"][0] != tokenizer.pad_id].tolist()
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
    assert (batch["input_ids"][~mask] == 0).all()
    labels = torch.tensor(expected["input_ids"]).masked_fill(~mask, -100)  # the official scripts' labels
    assert torch.equal(batch["targets"], F.pad(labels[:, 1:], (0, 1), value=-100))

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
        assert_same_batches(reference, batches)
    assert not torch.equal(reference[0]["input_ids"], reference[1]["input_ids"])


def test_paper_mode_loss_equals_the_models_own_labels_loss(tmp_path, tokenizer):
    """transformers' `labels=` loss (the official scripts') counts and weights the same targets."""
    from models import ModelConfig, build_model

    write_shard(tmp_path / "en" / "c4-train.00000-of-00001.json.gz", records(make_documents(6, seed=8, max_words=30)))
    batch = next(build_train_loader(config(tmp_path, packing=False, shuffle=False, seq_len=24), tokenizer,
                                    rank=0, world_size=1, micro_batch_size=6))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="t", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, vocab_size=tokenizer.vocab_size))
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == tokenizer.pad_id, -100)
    with torch.no_grad():
        official = model(input_ids=batch["input_ids"], labels=labels).loss
        logits = model(input_ids=batch["input_ids"]).logits
    ours = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
    assert 0 < int((batch["targets"] != -100).sum()) < batch["targets"].numel()
    torch.testing.assert_close(ours, official)


def test_workers_produce_the_same_stream(corpus, tokenizer):
    root, _, _ = corpus
    serial = take(build_train_loader(config(root), tokenizer, rank=1, world_size=2, micro_batch_size=2), 9)
    workers = take(build_train_loader(config(root, num_workers=2), tokenizer, rank=1, world_size=2, micro_batch_size=2), 9)
    assert_same_batches(serial, workers)


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
        assert_same_batches(uninterrupted[stop:], take(resumed, 14 - stop))


def test_a_saved_state_resumes_any_rank_and_world_size(corpus, tokenizer):
    root, _, _ = corpus
    cfg = config(root)
    two_ranks = [build_train_loader(cfg, tokenizer, rank=r, world_size=2, micro_batch_size=2) for r in range(2)]
    for loader in two_ranks:
        take(loader, 4)
    state = two_ranks[0].state_dict()
    assert state == two_ranks[1].state_dict()
    parts = [next(loader) for loader in two_ranks]
    expected = {key: torch.cat([part[key] for part in parts]) for key in ("input_ids", "targets")}
    single = build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=4)
    single.load_state_dict(state)
    assert_same_batches([expected], [next(single)])


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
    assert_same_batches(hub_batches, local_batches)
    hub_val = build_val_batches(hub_cfg, tokenizer, rank=0, world_size=1, micro_batch_size=4)
    local_val = build_val_batches(config(root), tokenizer, rank=0, world_size=1, micro_batch_size=4)
    assert_same_batches(hub_val, local_val)
    assert calls[0] == ("allenai/c4", "en", "train", True) and calls[-1][2] == "validation"


def target_rows(batches: list[dict[str, torch.Tensor]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input ids, targets) of every row that has a target."""
    return [(tuple(ids.tolist()), tuple(targets.tolist()))
            for b in batches for ids, targets in zip(b["input_ids"], b["targets"]) if (targets != -100).any()]


@pytest.mark.parametrize("packing", [True, False])
def test_validation_rows_do_not_depend_on_world_or_batch_size(corpus, tokenizer, packing):
    root, _, validation = corpus
    cfg = config(root, packing=packing)
    encoded = reference_ids(validation)
    if packing:  # first ceil(300 / 16) = 19 windows of 17 tokens of the file-order token stream
        stream = [t for ids in encoded for t in ids]
        expected_rows = [(tuple(stream[i * 16:(i + 1) * 16]), tuple(stream[i * 16 + 1:(i + 1) * 16 + 1]))
                         for i in range(19)]
    else:  # documents until 300 target tokens (all but each row's first real token) are reached
        expected_rows, kept = [], 0
        for ids in encoded:
            ids = ids if len(ids) <= 16 else ids[:15] + [tokenizer.eos_id]
            if len(ids) > 1:
                expected_rows.append((tuple(ids + [0] * (16 - len(ids))), tuple(ids[1:] + [-100] * (17 - len(ids)))))
            kept += len(ids) - 1
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
                    padding_rows = (b["targets"] == -100).all(dim=1)
                    assert (b["input_ids"][padding_rows] == tokenizer.pad_id).all()
                    assert b["input_ids"].shape == (micro, 16)


def test_validation_with_a_small_split_uses_all_of_it(corpus, tokenizer, caplog):
    root, _, validation = corpus
    cfg = config(root, val_tokens=10**9)
    batches = build_val_batches(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=4)
    total = sum(len(ids) for ids in reference_ids(validation))
    assert sum(int((b["targets"] != -100).sum()) for b in batches) == (total - 1) // 16 * 16
    assert "validation split exhausted" in caplog.text
