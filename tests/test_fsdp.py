"""FSDP2 (`trainer.parallelism=fsdp2`) against DDP, 2 CPU processes over gloo.

The DDP run is the oracle: one torchrun launch of tests/fsdp_worker.py trains DDP and FSDP2 copies
of a tiny int4 LLaMA side by side per optimizer; the sharded run must follow it (losses, gradient
norms, final weights) and hold the same whole-tensor statistics (AdaClip max |g|, AdaGN / GSNorm
norms, Adam-mini block means with heads straddling the shard boundary, Adafactor's factored
moments and RMS, SPAM's mask entries).
"""
from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from fsdp_worker import GATED, OPTIMIZERS, SKIPPED_STEP
from stablespam.sharding import block_sums, expand_blocks
from test_train_e2e import ROOT, command, free_port, launch_two, run, train_losses
from trainer import resume
from trainer.checkpoint import verify
from trainer.config import ConfigError, check_run_config, register_configs


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "results.json"
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), str(ROOT / "tests/fsdp_worker.py"), str(out)],
               timeout=240, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())




def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fsdp2_follows_ddp(side_by_side, name):
    ddp, fsdp = side_by_side[name]["ddp"], side_by_side[name]["fsdp"]
    assert len(ddp["loss"]) == len(fsdp["loss"]) == 10
    assert all(math.isfinite(x) for x in ddp["loss"])
    assert max(relative(a, b) for a, b in zip(ddp["loss"], fsdp["loss"])) < 1e-4
    assert max(relative(a, b) for a, b in zip(ddp["grad_norm"], fsdp["grad_norm"])) < 1e-5
    assert side_by_side[name]["param_max_abs_diff"] < 1e-4
    assert fsdp["transform_counts"] == ddp["transform_counts"]
    assert ddp["skipped"] == fsdp["skipped"] == [name in GATED and step == SKIPPED_STEP for step in range(10)]
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
    assert {"exp_avg_sq_row", "exp_avg_sq_col", "RMS"} <= kinds["adafactor"]
    assert side_by_side["stable_spam_official"]["ddp"]["transform_counts"]["adaclip_clipped_entries"] > 0
    assert side_by_side["spam"]["ddp"]["transform_counts"]["spike_clipped_entries"] > 0


def test_settings_without_exact_sharded_statistics_are_refused(side_by_side):
    refused = side_by_side["refused"]
    assert "optimizer.state_bits=4" in refused["optimizer.state_bits=4"]
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


def test_switching_between_ddp_and_fsdp2_on_resume_is_refused():
    with pytest.raises(ConfigError, match="trainer.parallelism cannot change on resume"):
        resume.refuse_unhonourable([("trainer.parallelism", "ddp", "fsdp2")])
    saved = OmegaConf.create({"trainer": {"seed": 1}})  # a checkpoint from before the key existed
    assert resume.changed_settings(saved, OmegaConf.create({"trainer": {"seed": 1, "parallelism": "ddp"}})) == []


@pytest.mark.slow
def test_train_py_fsdp2_follows_ddp_resumes_from_dcp_and_exports_whole_weights(tmp_path):
    """train.py end to end, 2 processes: FSDP2 against the DDP run, a resume from the sharded (DCP)
    checkpoint of step 3 against the uninterrupted FSDP2 run, and the HF export of the whole weights."""
    overrides = ["trainer.max_steps=6", "checkpoint.every=3", "trainer.global_batch_size=8", "checkpoint.export_hf=true",
                 "optimizer.reset_interval=4", "trainer.grad_clip=1.0"]
    ddp = launch_two(tmp_path / "ddp", *overrides)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = launch_two(tmp_path / "fsdp", *overrides, "trainer.parallelism=fsdp2")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "| fsdp2 |" in fsdp.stdout
    expected, losses = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "fsdp")
    assert sorted(losses) == list(range(1, 7))
    assert all(abs(losses[s] - expected[s]) / expected[s] < 1e-4 for s in expected)
    step_3 = tmp_path / "fsdp/checkpoints/step_00000003"
    assert not (step_3 / "model.safetensors").exists()
    assert "sharded/.metadata" in json.loads((step_3 / "manifest.json").read_text())["files"]

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(step_3, resumed_dir / "checkpoints" / step_3.name)
    shutil.copy(tmp_path / "fsdp/config.yaml", resumed_dir / "config.yaml")
    resumed = launch_two(resumed_dir, *overrides, "trainer.parallelism=fsdp2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step_00000003" in resumed.stdout
    after = train_losses(resumed_dir)
    assert sorted(after) == [4, 5, 6]
    assert all(after[s] == pytest.approx(losses[s], rel=1e-6) for s in after)

    # a corrupt shard is caught by the manifest like any checkpoint file
    shard = tmp_path / "fsdp/checkpoints/step_00000006/sharded/__1_0.distcp"
    intact = shard.read_bytes()
    shard.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))
    assert verify(shard.parents[1]) == "sharded/__1_0.distcp does not match its checksum"
    shard.write_bytes(intact)

    # the export holds the whole final weights: those of the last sharded checkpoint, gathered offline
    dcp_to_torch_save(tmp_path / "fsdp/checkpoints/step_00000006/sharded", tmp_path / "final.pt")
    final = torch.load(tmp_path / "final.pt", weights_only=False)["model"]
    with safe_open(str(tmp_path / "fsdp/hf/model.safetensors"), "pt") as exported:
        assert set(exported.keys()) == set(final)
        for name in exported.keys():
            assert torch.equal(exported.get_tensor(name), final[name]), name


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(tmp_path):
    """2 -> 3 processes: DCP reshards weights and moments; the run follows the uninterrupted one."""
    overrides = ["trainer.max_steps=6", "checkpoint.every=3", "trainer.global_batch_size=12", "trainer.parallelism=fsdp2",
                 "trainer.lr_schedule=constant", "optimizer.reset_interval=4"]
    reference = launch_two(tmp_path / "two", *overrides)
    assert reference.returncode == 0, reference.stderr[-3000:]
    step_3 = tmp_path / "two/checkpoints/step_00000003"
    shutil.copytree(step_3, tmp_path / "three/checkpoints" / step_3.name)
    shutil.copy(tmp_path / "two/config.yaml", tmp_path / "three/config.yaml")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "3",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    three = run(launcher + command(tmp_path / "three", *overrides)[1:], timeout=240, GLOO_SOCKET_IFNAME="lo")
    assert three.returncode == 0, three.stderr[-3000:]
    assert "elastic resume: 2 -> 3 process(es)" in three.stdout
    expected, resumed = train_losses(tmp_path / "two"), train_losses(tmp_path / "three")
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[s] == pytest.approx(expected[s], rel=1e-6) for s in resumed)


@pytest.mark.parametrize("overrides, world, message", [
    (["trainer.parallelism=zero3"], 2, "trainer.parallelism='zero3': choose one of ddp, fsdp2"),
    (["trainer.parallelism=fsdp2", "trainer.compile=true"], 2,
     "trainer.compile=true is not supported with trainer.parallelism=fsdp2"),
    (["trainer.parallelism=fsdp2"], 1, "trainer.parallelism=fsdp2 shards over processes but this run has one"),
])
def test_fsdp2_settings_that_cannot_run_are_refused(tiny_config, tmp_path, overrides, world, message):
    register_configs()
    with pytest.raises(ConfigError, match=f"^{message}"):
        check_run_config(tiny_config(tmp_path, *overrides), world)
