"""Pretrain a LLaMA model: `python train.py model=llama_130m optimizer=stable_spam quant=int4`.

The loop reads top to bottom: build the pieces from the composed config, resume if a checkpoint
exists (the checkpoint supplies state, the config every setting), then for each optimizer step set
the LR from the schedule, run `train_step`, and log, evaluate and save on their intervals. Config
schemas, checkpoints, the step, reporting and schedules live in `trainer/`.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import hydra
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from omegaconf import DictConfig, OmegaConf

import data
import models
import quant
import stablespam
from stablespam.gating import prepare as prepare_gating
from trainer import resume
from trainer.checkpoint import CheckpointError, CheckpointManager, elastic_seed, saved_config
from trainer.config import ConfigError, check_run_config, register_configs
from trainer.metrics import device_peak_flops, peak_memory_gib
from trainer.parallel import export_state_dict, shard_model
from trainer.reporting import METRICS_FILE, Reporter, resolve_wandb_mode
from trainer.runtime import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER, PreemptionFlag, finish, resolve_run_dir
from trainer.schedule import WarmupDecay, set_learning_rates
from trainer.instruments import quantization_sqnr
from trainer.spikes import SpikeDetector
from trainer.step import NonFiniteLossError, RunningTotals, nonfinite, target_count, token_loss_sum, train_step

register_configs()

# The project's own errors: each stops a run with one `error: ...` line; anything else keeps its traceback.
USER_ERRORS = (ConfigError, CheckpointError, NonFiniteLossError, data.DataError, quant.QuantConfigError,
               quant.Fp8UnavailableError, stablespam.OptimizerConfigError)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], accelerator: Accelerator) -> float:
    """True token-weighted mean loss over the fixed validation set, summed over all ranks.

    In eval mode the quantized layers round to nearest, so evaluation never draws from the
    stochastic-rounding streams and `eval_every` cannot change the training trajectory.
    """
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        totals[0] += token_loss_sum(model, batch).double()
        totals[1] += target_count(batch)
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    return (totals[0] / totals[1]).item()


def prepare_run_dir(cfg: DictConfig, run_dir: Path, checkpoints: CheckpointManager,
                    accelerator: Accelerator) -> tuple[Path | None, list[tuple[str, Any, Any]]]:
    """Pick the checkpoint to resume (None: a fresh run), check what changed, write the config files.

    The first run's `config.yaml` is never overwritten; a resume with changed settings writes its
    config beside it as `config.step_<N>.yaml`.
    """
    ckpt = cfg.checkpoint
    if not ckpt.resume:
        if checkpoints.complete_checkpoints() or checkpoints.set_aside():
            if not ckpt.overwrite:
                raise ConfigError(
                    f"checkpoint.resume=false but {checkpoints.directory} holds checkpoints of an earlier run; "
                    f"set checkpoint.overwrite=true to clear them, or use another run_dir"
                )
        if ckpt.overwrite:
            checkpoints.clear()
            if accelerator.is_main_process:
                for stale in (*run_dir.glob("config.step_*.yaml"), run_dir / METRICS_FILE, run_dir / PREEMPTED_MARKER):
                    stale.unlink(missing_ok=True)
                shutil.rmtree(run_dir / "hf", ignore_errors=True)
    resume_from = checkpoints.latest_intact() if ckpt.resume else None
    changes: list[tuple[str, Any, Any]] = []
    if resume_from is not None:
        changes = resume.changed_settings(saved_config(resume_from), cfg)
        resume.refuse_unhonourable(changes)
    if accelerator.is_main_process:
        if resume_from is None:
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        elif changes:
            OmegaConf.save(cfg, run_dir / f"config.{resume_from.name}.yaml", resolve=True)
    return resume_from, changes


def train(cfg: DictConfig) -> dict[str, float]:
    tcfg = cfg.trainer
    wandb_mode = resolve_wandb_mode(cfg.logging.wandb_mode)
    accelerator = Accelerator(
        cpu=tcfg.cpu,
        mixed_precision="bf16" if tcfg.precision == "bf16_mixed" else "no",
        log_with="wandb" if wandb_mode != "disabled" else None,
        # gradients live in DDP's all-reduce buckets instead of a second copy beside them
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
    )
    preemption = PreemptionFlag(accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    accum_steps = check_run_config(cfg, world)
    run_dir = resolve_run_dir(accelerator, cfg.run_dir, cfg.output_root)

    def warn(message: str) -> None:
        if accelerator.is_main_process:
            print(message, file=sys.stderr)

    checkpoints = CheckpointManager(accelerator, run_dir / "checkpoints", cfg.checkpoint.keep_last, warn)
    resume_from, changes = prepare_run_dir(cfg, run_dir, checkpoints, accelerator)

    # Model, quantization, optimizer: built identically on every rank from the seed, on the device
    # the run uses, so the optimizer sees its parameters where they live (fused AdamW on CUDA).
    set_seed(tcfg.seed)
    tokenizer = data.build_tokenizer(cfg.data)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer} has {tokenizer.vocab_size} pieces but model.vocab_size="
            f"{cfg.model.vocab_size}; pick a model with a large enough vocabulary"
        )
    model = models.build_model(cfg.model, torch.bfloat16 if tcfg.precision == "pure_bf16" else torch.float32)
    converter = quant.build_converter(cfg.quant)
    converter.seed(tcfg.seed, rank)
    model = converter.convert(model).to(accelerator.device)
    fsdp = tcfg.parallelism == "fsdp2"
    if fsdp:  # after the converter (QuantLinear keeps the Parameters), before the optimizer (it holds the shards)
        model = shard_model(model, tcfg.precision)
    optimizer = stablespam.build_optimizer(model, cfg.optimizer, total_steps=tcfg.max_steps)
    shard_group = torch.distributed.group.WORLD if fsdp else None  # what TransformStats sums its shard counts over
    base_lrs = [group["base_lr"] for group in optimizer.param_groups]
    schedule = WarmupDecay.from_config(tcfg)
    if tcfg.compile:
        if cfg.quant.name.endswith("_official"):  # the official formats round op by op in bf16
            torch._inductor.config.emulate_precision_casts = True
        model = torch.compile(model)
    if fsdp:
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)

    train_loader = data.build_train_loader(
        cfg.data, tokenizer, rank=rank, world_size=world, micro_batch_size=tcfg.micro_batch_size
    )
    val_batches = data.build_val_batches(cfg.data, tokenizer, rank=rank, world_size=world,
                                         micro_batch_size=tcfg.micro_batch_size)

    # Everything a checkpoint holds besides the model, the optimizer and the RNG streams.
    totals = RunningTotals(accelerator.device)
    spikes = SpikeDetector(tcfg.spike_window, tcfg.spike_z, accelerator.device)
    loop = {"step": 0, "wandb_id": None}
    reporter_notes: list[str] = []

    def rank_state() -> dict[str, Any]:
        return {"loop": dict(loop), "totals": totals.state_dict(), "spikes": spikes.state_dict(),
                "data": train_loader.state_dict(), "quant": converter.state_dict()}

    def restore(state: dict[str, Any]) -> None:
        loop.update(state["loop"])
        totals.load_state_dict(state["totals"])
        for key in ("skipped_steps", "spike_skips"):  # loop counters of checkpoints before device skip counts
            if key in loop:
                getattr(totals, key).fill_(loop.pop(key))
        spikes.load_state_dict(state["spikes"])
        train_loader.load_state_dict(state["data"])
        if state["saved_world_size"] == world:
            converter.load_state_dict(state["quant"])
        else:  # elastic resume: per-rank random streams restart from (seed, rank, step)
            seed = elastic_seed(tcfg.seed, rank, loop["step"])
            set_seed(seed)
            converter.seed(seed, rank)
            reporter_notes.append(f"elastic resume: {state['saved_world_size']} -> {world} process(es); "
                                  f"per-rank random streams restart from (seed, rank, step)")

    if resume_from is not None:
        restore(checkpoints.load(resume_from, model, getattr(optimizer, "optimizer", optimizer),
                                 stablespam.load_state_keeping_hyperparameters))
        if accelerator.is_main_process:
            (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
    step = loop["step"]
    reporter = Reporter(accelerator, run_dir, tcfg.max_steps, cfg.logging.progress, resumed_step=step)
    if wandb_mode != "disabled":
        import wandb

        loop["wandb_id"] = loop["wandb_id"] or uuid.uuid4().hex[:8]
        accelerator.init_trackers(
            cfg.logging.project,
            config=OmegaConf.to_container(cfg, resolve=True),
            init_kwargs={"wandb": {"id": loop["wandb_id"], "resume": "allow", "mode": wandb_mode, "dir": str(run_dir),
                                   "name": cfg.logging.run_name or run_dir.name,
                                   "settings": wandb.Settings(silent=True, console="off")}},
        )

    n_params = models.count_parameters(accelerator.unwrap_model(model))
    flops_per_token = models.matmul_flops_per_token(cfg.model, cfg.data.seq_len)
    peak_flops = device_peak_flops(accelerator.device, tcfg.precision)
    started_from = f"resumed from {resume_from.name} at step {step}" if resume_from else "new run"
    reporter.info(f"run {run_dir} ({started_from}; full config in config.yaml)")
    if changes:
        reporter.info(resume.describe(changes))
    for note in reporter_notes:
        reporter.info(note)
    reporter.info(
        f"model {cfg.model.name} {n_params / 1e6:.1f}M params | {tcfg.parallelism} | precision {tcfg.precision}"
        f"{' | compiled' if tcfg.compile else ''} | quant {converter.describe()}"
    )
    reporter.info(
        f"optimizer {cfg.optimizer.name} lr {cfg.optimizer.lr} | {tcfg.lr_schedule} schedule, {tcfg.warmup_steps} warmup, "
        f"{tcfg.max_steps} steps | clip {tcfg.grad_clip or 'off'}"
    )
    reporter.info(
        f"data {cfg.data.name} seq {cfg.data.seq_len} {'packed' if cfg.data.packing else 'padded'} | "
        f"{tcfg.global_batch_size} seq/step = {tcfg.micro_batch_size} x {world} process(es) x {accum_steps} "
        f"accumulation | {accelerator.device}"
    )
    reporter.info(train_loader.describe())
    results: dict[str, float] = {}
    if tcfg.eval_at_start and step == 0:
        results["initial_val_loss"] = evaluate(model, val_batches, accelerator)
        reporter.info(f"step 0 | val_loss {results['initial_val_loss']:.4f} | "
                      f"val_ppl {math.exp(results['initial_val_loss']):.2f}")
        reporter.log(0, {"val_loss": results["initial_val_loss"], "val_ppl": math.exp(results["initial_val_loss"])},
                     console=False)

    def stop_if_nonfinite() -> None:
        bad = totals.nonfinite_step() if tcfg.nonfinite_policy == "stop" else None
        if bad is not None:
            raise NonFiniteLossError(
                f"non-finite loss or gradient norm at step {bad}; the last good checkpoint is "
                f"{checkpoints.latest() or 'none (no checkpoint saved yet)'}. Lower optimizer.lr (a resume "
                f"follows the new value), enable trainer.grad_clip, or set trainer.nonfinite_policy=skip"
            )

    def stop_if_stuck() -> None:
        """Too many consecutive skipped updates (read on logging steps and before saves)."""
        longest, last = totals.skip_runs()
        if longest > tcfg.max_consecutive_skips:
            raise NonFiniteLossError(
                f"{longest} updates skipped in a row (the last at step {last}; trainer.max_consecutive_skips="
                f"{tcfg.max_consecutive_skips}); the last checkpoint is {checkpoints.latest() or 'none'}"
            )

    def save_checkpoint() -> Path:
        stop_if_nonfinite()
        if skipping:
            stop_if_stuck()
        return checkpoints.save(step, model, optimizer, rank_state(), cfg)

    def skip_if(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        skip = torch.zeros((), dtype=torch.bool, device=accelerator.device)
        if tcfg.nonfinite_policy == "skip":
            skip |= nonfinite(loss, grad_norm)
        if tcfg.spike_policy == "skip":
            skip |= spikes.is_spike(loss, grad_norm)
        return skip

    skipping = tcfg.nonfinite_policy == "skip" or tcfg.spike_policy == "skip"
    if skipping:
        reporter.info(prepare_gating(optimizer))
    batches = iter(train_loader)
    lr = None
    window_start, paused = time.perf_counter(), 0.0
    reporter.start(step)
    while step < tcfg.max_steps:
        converter.set_step(step, tcfg.max_steps)  # the precision policy (quant.bf16_last_fraction)
        lr = set_learning_rates(optimizer, base_lrs, schedule(step))
        micro_batches = [{k: v.to(accelerator.device, non_blocking=True) for k, v in next(batches).items()}
                         for _ in range(accum_steps)]
        will_log = (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.max_steps
        transforms = stablespam.TransformStats(accelerator.device) if will_log else None  # what the stabilizers did
        with stablespam.recording(transforms) if transforms else contextlib.nullcontext():
            out = train_step(model, optimizer, micro_batches, accelerator, grad_clip=tcfg.grad_clip,
                             skip_if=skip_if if skipping else None)
        step += 1  # a skipped update still uses up its batch and its LR-schedule position
        loop["step"] = step
        totals.add(out, step)
        if tcfg.spike_policy == "skip":
            spikes.accept(out.loss, out.grad_norm, taken=~out.skipped)

        logging_step = step % tcfg.log_every == 0 or step == tcfg.max_steps
        if logging_step:
            stop_if_nonfinite()
            if skipping:
                stop_if_stuck()
            window = totals.read_window()
            if window["window_skipped"]:
                reporter.info(f"step {step}: {window['window_skipped']} update(s) skipped since the last log "
                              f"(the last at step {window['last_skipped_step']}; {window['skipped_steps']} in all, "
                              f"{window['spike_skips']} as spikes)")
            elapsed = time.perf_counter() - window_start - paused
            tokens_per_s = window["window_tokens"] / elapsed if elapsed > 0 else None
            grad_norm = window["grad_norm"]
            reporter.log(step, {
                "loss": window["loss"], "ppl": math.exp(min(window["loss"], 50.0)), "lr": lr,
                "grad_norm": grad_norm, "grad_norm_max": window["grad_norm_max"],
                "grad_norm_clipped": min(grad_norm, tcfg.grad_clip) if tcfg.grad_clip else grad_norm,
                "tokens_seen": window["tokens_seen"], "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * flops_per_token / (peak_flops * world) if peak_flops and tokens_per_s else None,
                "peak_mem_gib": peak_memory_gib(accelerator.device), "skipped_steps": window["skipped_steps"],
                "spike_skips": window["spike_skips"], "window_skipped": window["window_skipped"],
                "last_skipped_step": window["last_skipped_step"],
                "data_skipped_lines": train_loader.skipped_lines,
                **(transforms.read(shard_group) if transforms else {}),
            }, console=True)
            window_start, paused = time.perf_counter(), 0.0
        interrupted = time.perf_counter()
        if logging_step and tcfg.quant_error_every and step % tcfg.quant_error_every < tcfg.log_every:
            reporter.log(step, quantization_sqnr(accelerator.unwrap_model(model), micro_batches[0]), console=False)
        if step % tcfg.eval_every == 0 or step == tcfg.max_steps:
            val_loss = evaluate(model, val_batches, accelerator)
            results["val_loss"] = val_loss
            reporter.info(f"step {step} | val_loss {val_loss:.4f} | val_ppl {math.exp(val_loss):.2f}")
            reporter.log(step, {"val_loss": val_loss, "val_ppl": math.exp(val_loss)}, console=False)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 or step == tcfg.max_steps:
            save_checkpoint()
        if preemption.should_stop(syncing_step=logging_step):
            path = save_checkpoint()
            if accelerator.is_main_process:
                (run_dir / PREEMPTED_MARKER).write_text(f"{path}\n")
            reporter.info(f"preemption signal received: saved {path}; run the same command to resume")
            reporter.close()
            finish(accelerator)
            sys.exit(PREEMPTED_EXIT_CODE)
        paused += time.perf_counter() - interrupted

    reporter.close()
    if cfg.checkpoint.export_hf:
        weights = export_state_dict(model) if fsdp else None  # gathered from the shards on every rank
        if accelerator.is_main_process:
            transformers.utils.logging.disable_progress_bar()
            accelerator.unwrap_model(model).save_pretrained(run_dir / "hf", state_dict=weights)
            data.export_tokenizer(tokenizer, run_dir / "hf")
    results["step"] = step
    if "val_loss" in results:
        start = f" (from {math.exp(results['initial_val_loss']):.2f} at step 0)" if "initial_val_loss" in results else ""
        reporter.info(f"done: {step} steps, validation perplexity {math.exp(results['val_loss']):.2f}{start} | {run_dir}")
    finish(accelerator)
    return results


def run(cfg: DictConfig) -> None:
    """`train`, with the project's own errors as one `error:` line and exit code 2."""
    try:
        train(cfg)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
