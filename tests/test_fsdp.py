"""FSDP2 (`trainer.parallelism=fsdp2`) against DDP, 2 CPU processes over gloo.

The DDP run is the oracle: one torchrun launch of tests/fsdp_worker.py trains DDP and FSDP2 copies
of a tiny int4 LLaMA side by side per optimizer; the sharded run must follow it (losses, gradient
norms, final weights) and hold the same whole-tensor statistics (AdaClip max |g|, AdaGN / GSNorm
norms, Adam-mini block means with heads straddling the shard boundary, SPAM's mask entries).
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from stablespam.sharding import block_sums, expand_blocks
from test_train_e2e import ROOT, free_port, run


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "results.json"
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), str(ROOT / "tests/fsdp_worker.py"), str(out)],
               timeout=240, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


OPTIMIZERS = ["adamw", "stable_spam_official", "stable_spam_corrected", "spam", "adam_mini", "lion_adagn_adaclip",
              "adam_gradient_stabilizer"]


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_follows_ddp(side_by_side, name):
    ddp, fsdp = side_by_side[name]["ddp"], side_by_side[name]["fsdp"]
    assert len(ddp["loss"]) == len(fsdp["loss"]) == 10
    assert all(math.isfinite(x) for x in ddp["loss"])
    assert max(relative(a, b) for a, b in zip(ddp["loss"], fsdp["loss"])) < 1e-4
    assert max(relative(a, b) for a, b in zip(ddp["grad_norm"], fsdp["grad_norm"])) < 1e-5
    assert side_by_side[name]["param_max_abs_diff"] < 1e-4
    assert ddp["statistics"].keys() == fsdp["statistics"].keys()
    for key, expected in ddp["statistics"].items():
        if key.endswith(".mask"):
            assert fsdp["statistics"][key] == expected, key
        else:
            assert fsdp["statistics"][key] == pytest.approx(expected, rel=1e-4, abs=1e-12), key


def test_the_statistics_are_checked(side_by_side):
    """The oracle compares something: each stabilized optimizer holds its whole-tensor statistics."""
    kinds = {name: {key.rsplit(".", 1)[1] for key in side_by_side[name]["ddp"]["statistics"]} for name in OPTIMIZERS}
    assert {"max_ema", "norm_ema", "norm_sq_ema"} <= kinds["stable_spam_official"]
    assert {"max_ema", "norm_ema", "norm_sq_ema"} <= kinds["lion_adagn_adaclip"]
    assert {"gs_norm_ema", "gs_norm_sq_ema"} <= kinds["adam_gradient_stabilizer"]
    assert "vmean" in kinds["adam_mini"] and "mask" in kinds["spam"]


def test_settings_without_exact_sharded_statistics_are_refused(side_by_side):
    refused = side_by_side["refused"]
    assert "optimizer.state_bits=4" in refused["optimizer.state_bits=4"]
    assert "optimizer.kind=adafactor" in refused["optimizer=adafactor"]
    assert "optimizer.compile=true" in refused["optimizer.compile=true"]
    assert all("trainer.parallelism=fsdp2" in message for message in refused.values())


@pytest.mark.parametrize("offset, numel", [(0, 12), (12, 12), (5, 14), (7, 0)])
def test_block_sums_of_shards_add_up_to_the_whole_tensors(offset, numel):
    whole = torch.arange(24, dtype=torch.float32) ** 2
    shards = [(0, whole[:offset]), (offset, whole[offset:offset + numel]), (offset + numel, whole[offset + numel:])]
    total = sum(block_sums(shard, start, 8, 3) for start, shard in shards)
    assert torch.equal(total, whole.view(3, 8).sum(dim=1))
    per_block = torch.tensor([10.0, 20.0, 30.0])
    assert torch.equal(expand_blocks(per_block, offset, 8, numel), per_block.repeat_interleave(8)[offset:offset + numel])
