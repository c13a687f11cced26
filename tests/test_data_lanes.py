"""Lanes in the text pipeline: each rank reads only its share of the shards, global batches unchanged.

The reference rows are built from sentencepiece's encoding of each document, following the
documented layout (shard i in lane i mod L, runs of `lane_rows` rows from each lane in turn).
"""
from __future__ import annotations

import json

import pytest

from data import DataError, build_train_loader
from data.sources import LocalShards
from data.stream import LaneLayout, Reader
from test_data_pipeline import (assert_same_batches, config, global_batches, make_documents, records, reference_ids,
                                take, tokenizer, write_shard)  # noqa: F401 (tokenizer is a fixture)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("c4")
    shards = [make_documents(n, seed=20 + s) for s, n in enumerate((23, 17, 30, 12))]
    for i, texts in enumerate(shards):
        write_shard(root / "en" / f"c4-train.{i:05d}-of-00004.json.gz", records(texts))
    write_shard(root / "en" / "c4-validation.00000-of-00001.json.gz", records(make_documents(5, seed=1)))
    return root, shards


def test_global_rows_follow_the_lane_layout(corpus, tokenizer):
    root, shards = corpus
    cfg = config(root, shuffle=False, lanes=2, lane_rows=3)
    lane_streams = [[t for texts in shards[lane::2] for ids in reference_ids(texts) for t in ids] * 4 for lane in range(2)]
    rows = torch_rows(take(build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=4), 30))
    for g, row in enumerate(rows):
        lane, lane_row = (g // 3) % 2, g // 6 * 3 + g % 3
        assert row == lane_streams[lane][16 * lane_row: 16 * lane_row + 16]


def torch_rows(batches) -> list[list[int]]:
    return [row.tolist() for batch in batches for row in batch["input_ids"]]


@pytest.mark.parametrize("packing", [True, False])
def test_global_batches_do_not_depend_on_ranks_or_workers(corpus, tokenizer, packing):
    root, _ = corpus
    cfg = config(root, packing=packing, lanes=4, lane_rows=2)
    reference = global_batches(cfg, tokenizer, world_size=1, global_batch=8, steps=12)
    for world_size, workers in ((2, 0), (4, 0), (2, 2)):
        batches = global_batches(config(root, packing=packing, lanes=4, lane_rows=2, num_workers=workers), tokenizer,
                                 world_size=world_size, global_batch=8, steps=12)
        assert_same_batches(reference, batches)


def test_each_rank_opens_only_the_shards_of_its_lanes(corpus, tokenizer, monkeypatch):
    root, _ = corpus
    opened = []
    original = LocalShards.records

    def spy(self, shard, start_line):
        opened.append(self.files[shard].name)
        return original(self, shard, start_line)

    monkeypatch.setattr(LocalShards, "records", spy)
    cfg = config(root, lanes=4, lane_rows=2)
    for rank in range(4):  # rank r's rows [8k + 2r, 8k + 2r + 2) are one run of lane r, whose only shard is r
        opened.clear()
        loader = build_train_loader(cfg, tokenizer, rank=rank, world_size=4, micro_batch_size=2)
        take(loader, 20)  # several epochs of its lane
        assert set(opened) == {f"c4-train.{rank:05d}-of-00004.json.gz"}
        assert loader.describe() == ("data: 4 lane(s) of 2 rows over 4 train shard(s); each of 4 rank(s) reads at "
                                     "most 1 lane(s) (1 shard(s))")


def test_readers_and_the_start_up_line():
    layout = LaneLayout(count=4, rows=2)
    assert [layout.lane(g) for g in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]
    assert [layout.lane_row(g) for g in range(10)] == [0, 1, 0, 1, 0, 1, 0, 1, 2, 3]
    assert all(layout.global_row(layout.lane(g), layout.lane_row(g)) == g for g in range(100))
    assert [layout.rows_before(1, n) for n in (0, 2, 3, 4, 9, 12)] == [0, 0, 1, 2, 2, 4]
    assert [Reader.of(0, 1, 8, w, 2).lanes(layout) for w in range(2)] == [[0, 1], [2, 3]]
    assert Reader.of(0, 1, 3, 0, 1).lanes(layout) == [0, 1, 2, 3]  # micro-batches that do not align with runs


def test_resume_with_lanes_is_exact_and_refuses_another_rank(corpus, tokenizer):
    root, _ = corpus
    cfg = config(root, lanes=4, lane_rows=2, num_workers=2)
    uninterrupted = take(build_train_loader(cfg, tokenizer, rank=1, world_size=2, micro_batch_size=4), 12)
    first = build_train_loader(cfg, tokenizer, rank=1, world_size=2, micro_batch_size=4)
    take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_train_loader(cfg, tokenizer, rank=1, world_size=2, micro_batch_size=4)
    resumed.load_state_dict(state)
    assert_same_batches(uninterrupted[5:], take(resumed, 7))
    single = build_train_loader(cfg, tokenizer, rank=0, world_size=1, micro_batch_size=8)
    with pytest.raises(DataError, match=r"lane_readers: saved \[2, 4\], now \[1, 8\]"):
        single.load_state_dict(state)


def test_lane_and_worker_settings_are_checked(corpus, tokenizer, caplog):
    root, _ = corpus
    build_train_loader(config(root, lanes=3), tokenizer, rank=0, world_size=1, micro_batch_size=2)
    assert "4 train shards do not divide into data.lanes=3 equal lanes" in caplog.text
    with pytest.raises(DataError, match=r"data.lanes=5 needs at least 5 train shards but there are 4; set data.lanes=4"):
        build_train_loader(config(root, lanes=5), tokenizer, rank=0, world_size=1, micro_batch_size=2)
    with pytest.raises(DataError, match=r"data.num_workers=3 exceeds the micro batch size 2"):
        build_train_loader(config(root, num_workers=3), tokenizer, rank=0, world_size=1, micro_batch_size=2)
