"""torchrun worker of tests/test_fsdp.py: DDP and FSDP2 copies of one tiny int4 LLaMA trained side by
side, per optimizer, on the same batches through `trainer.step.train_step`.

`torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT.json` writes (rank 0), per optimizer: both
runs' losses, gradient norms and skipped updates (the GATED runs drop one through the device-gated
step), the largest |difference| of the final parameters, and the
optimizers' whole-tensor statistics and what the transforms did (TransformStats) from both runs;
and the messages of the settings refused on
shards. The DDP copy is the oracle: every rank holds the
whole tensors there. Hidden size 24 with 3 heads puts the boundary of the two shards of q/k_proj
inside an attention head, so Adam-mini's per-head blocks straddle shards; Adafactor's column
moments and RMS values need the other shard's rows.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from hydra import compose, initialize_config_dir
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import models
import quant
import stablespam
from trainer.config import register_configs
from trainer.parallel import shard_model
from trainer.step import train_step

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODEL = ["model=llama_tiny", "model.hidden_size=24", "model.intermediate_size=40", "model.num_hidden_layers=2",
         "model.num_attention_heads=3", "model.vocab_size=64"]
STEPS, MICRO_BATCHES, ROWS, SEQ = 10, 2, 2, 16
# name -> (optimizer preset, overrides, trainer.grad_clip); resets, delays and warmups short enough
# that resets, spike clipping and SPAM's mask redraw happen within the 10 steps
OPTIMIZERS = {
    "adamw": ("adamw", ["optimizer.lr=1e-2", "optimizer.weight_decay=0.1"], 1.0),
    "stable_spam_official": ("stable_spam", ["optimizer.lr=1e-2", "optimizer.mode=official",
                                             "optimizer.reset_interval=4", "optimizer.total_steps=-1"], 0.0),
    "stable_spam_corrected": ("stable_spam", ["optimizer.lr=1e-2", "optimizer.mode=corrected",
                                              "optimizer.reset_interval=4", "optimizer.total_steps=-1",
                                              "optimizer.weight_decay=0.1"], 0.0),
    "spam": ("spam", ["optimizer.lr=1e-2", "optimizer.density=0.5", "optimizer.reset_interval=4",
                      "optimizer.warmup_steps=2", "optimizer.clip_delay=2", "optimizer.threshold=2",
                      "optimizer.weight_decay=0.1"], 0.0),
    "adam_mini": ("adam_mini", ["optimizer.lr=1e-2", "optimizer.weight_decay=0.1"], 0.0),
    "lion_adagn_adaclip": ("lion_adagn_adaclip", ["optimizer.lr=1e-3"], 0.0),
    "adafactor": ("adafactor", ["optimizer.lr=1e-2", "optimizer.weight_decay=0.1"], 0.0),
    "adafactor_relative_step": ("adafactor", ["optimizer.lr=null", "optimizer.relative_step=true",
                                              "optimizer.scale_parameter=true", "optimizer.beta1=null"], 0.0),
    "adam_gradient_stabilizer": ("adam", ["optimizer.lr=1e-2", "optimizer.gradient_stabilizer=true",
                                          "optimizer.spike_clip=true", "optimizer.spike_delay=2",
                                          "optimizer.spike_threshold=2", "optimizer.moret_interval=4"], 0.0),
}
# these runs drop the update of step SKIPPED_STEP through the device-gated step (stablespam.gating)
GATED, SKIPPED_STEP = ("adamw", "stable_spam_official", "lion_adagn_adaclip", "adam_gradient_stabilizer"), 5
# per-parameter statistics that must be the whole tensor's, hence equal in both runs
STATISTICS = ("max_ema", "norm_ema", "norm_sq_ema", "vmean", "gs_norm_ema", "gs_norm_sq_ema", "exp_avg_sq_row",
              "exp_avg_sq_col", "RMS")


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def batches(step: int, rank: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    out = []
    for _ in range(MICRO_BATCHES):
        tokens = torch.randint(0, 64, (ROWS, SEQ + 1), generator=generator)
        out.append({"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]})
    return out


def build(cfg, rank: int) -> torch.nn.Module:
    torch.manual_seed(0)
    converter = quant.build_converter(cfg.quant)
    converter.seed(0, rank)
    return converter.convert(models.build_model(cfg.model))


def statistics(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, list[float]]:
    names = {p: name for name, p in model.named_parameters()}
    out = {}
    for p, state in optimizer.state.items():
        for key in STATISTICS:
            if key in state:
                out[f"{names[p]}.{key}"] = full(state[key]).reshape(-1).tolist()
        if "mask" in state:  # SPAM's sparse-momentum entries, as flat indices of the whole tensor
            mask = full(state["mask"])
            out[f"{names[p]}.mask"] = (mask.reshape(-1).nonzero().flatten() if mask.dtype == torch.bool
                                       else mask).tolist()
    return out


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    register_configs()
    results = {}
    for name, (preset, overrides, grad_clip) in OPTIMIZERS.items():
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"optimizer={preset}", "quant=int4", *MODEL, *overrides])
        ddp_model = build(cfg, rank)
        fsdp_model = shard_model(copy.deepcopy(ddp_model), "fp32")
        runs = {}
        for kind, model in (("ddp", ddp_model), ("fsdp", fsdp_model)):
            optimizer = stablespam.build_optimizer(model, cfg.optimizer, total_steps=STEPS)
            wrapped = DistributedDataParallel(model) if kind == "ddp" else model
            losses, norms, skipped = [], [], []
            counts = stablespam.TransformStats("cpu")
            with stablespam.recording(counts):
                for step in range(STEPS):
                    skip_if = (lambda loss, norm, s=step: torch.tensor(s == SKIPPED_STEP)) if name in GATED else None
                    out = train_step(wrapped, optimizer, batches(step, rank), accelerator, grad_clip=grad_clip,
                                     skip_if=skip_if)
                    losses.append(float(out.loss))
                    norms.append(float(out.grad_norm))
                    skipped.append(out.skipped is not None and bool(out.skipped))
            runs[kind] = {"loss": losses, "grad_norm": norms, "skipped": skipped,
                          "statistics": statistics(optimizer, model),
                          "transform_counts": counts.read(dist.group.WORLD if kind == "fsdp" else None),
                          "params": {n: full(p.detach()) for n, p in model.named_parameters()}}
        param_diff = max((runs["ddp"]["params"][n] - runs["fsdp"]["params"][n]).abs().max().item()
                         for n in runs["ddp"]["params"])
        results[name] = {kind: {k: v for k, v in run.items() if k != "params"} for kind, run in runs.items()}
        results[name]["param_max_abs_diff"] = param_diff
    results["refused"] = {}
    for setting in ("optimizer.state_bits=4", "optimizer.compile=true"):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*MODEL, "optimizer=stable_spam", setting])
        try:
            stablespam.build_optimizer(shard_model(build(cfg, rank), "fp32"), cfg.optimizer, total_steps=STEPS)
        except stablespam.OptimizerConfigError as error:
            results["refused"][setting] = str(error)
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
