"""Pretrain a LLaMA model: `python train.py model=llama_130m optimizer=stable_spam quant=int4`.

The loop reads top to bottom: build the pieces from the composed config, resume if a checkpoint
exists, then for each optimizer step accumulate micro-batches, clip, step, log, evaluate and save.
Everything else (config schemas, checkpoints, reporting, schedules) lives in `trainer/`.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
import uuid
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

import data
import models
import quant
import stablespam
from trainer.checkpoint import CheckpointManager
from trainer.config import check_run_config, register_configs
from trainer.metrics import device_peak_flops, peak_memory_gib
from trainer.reporting import Reporter, resolve_wandb_mode
from trainer.runtime import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER, PreemptionFlag, finish, resolve_run_dir
from trainer.schedule import build_scheduler

register_configs()


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient and the policy says stop."""


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over target positions (targets != -100), in fp32.

    No attention mask: padding (paper mode) is always on the right, so with causal attention no
    real token ever attends to a pad token, and SDPA keeps its fast causal kernel.
    The data already aligns targets[b, i] with input_ids[b, i], so no logit is sliced or dropped.
    """
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100, reduction="sum")


def target_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["targets"] != -100).sum()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], accelerator: Accelerator) -> float:
    """True token-weighted mean loss over the fixed validation set, summed over all ranks."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        totals[0] += token_loss_sum(model, batch).double()
        totals[1] += target_count(batch)
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    return (totals[0] / totals[1]).item()


def train(cfg: DictConfig) -> dict[str, float]:
    tcfg = cfg.trainer
    wandb_mode = resolve_wandb_mode(cfg.logging.wandb_mode)
    accelerator = Accelerator(
        cpu=tcfg.cpu,
        mixed_precision="bf16" if tcfg.precision == "bf16_mixed" else "no",
        log_with="wandb" if wandb_mode != "disabled" else None,
    )
    preemption = PreemptionFlag(accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    accum_steps = check_run_config(cfg, world)
    run_dir = resolve_run_dir(accelerator, cfg.run_dir, cfg.output_root)
    reporter = Reporter(accelerator, run_dir, tcfg.max_steps, cfg.logging.progress)
    checkpoints = CheckpointManager(accelerator, run_dir / "checkpoints", cfg.checkpoint.keep_last)
    resume_from = checkpoints.latest() if cfg.checkpoint.resume else None
    if accelerator.is_main_process:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    reporter.info(OmegaConf.to_yaml(cfg, resolve=True))

    # Model, quantization, optimizer, schedule: built identically on every rank from the seed.
    set_seed(tcfg.seed)
    tokenizer = data.build_tokenizer(cfg.data)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer {cfg.data.tokenizer} has {tokenizer.vocab_size} pieces but model.vocab_size="
            f"{cfg.model.vocab_size}; pick a model with a large enough vocabulary"
        )
    model = models.build_model(cfg.model, torch.bfloat16 if tcfg.precision == "pure_bf16" else torch.float32)
    converter = quant.build_converter(cfg.quant)
    converter.seed(tcfg.seed, rank)
    model = converter.convert(model)
    optimizer = stablespam.build_optimizer(model, cfg.optimizer, total_steps=tcfg.max_steps)
    scheduler = build_scheduler(optimizer, tcfg.lr_schedule, tcfg.warmup_steps, tcfg.max_steps, tcfg.min_lr_ratio)
    if tcfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    train_loader = data.build_train_loader(
        cfg.data, tokenizer, rank=rank, world_size=world, micro_batch_size=tcfg.micro_batch_size
    )
    val_batches = data.build_val_batches(cfg.data, tokenizer, rank=rank, world_size=world,
                                         micro_batch_size=tcfg.micro_batch_size)

    step, tokens_seen, skipped_in_a_row, wandb_id = 0, 0, 0, None
    if resume_from is not None:
        state = checkpoints.load(resume_from)
        step, tokens_seen, wandb_id = state["step"], state["tokens_seen"], state["wandb_id"]
        train_loader.load_state_dict(state["data"])
        converter.load_state_dict(state["quant"])
        reporter.info(f"resumed from {resume_from} at step {step}")
        if accelerator.is_main_process:
            (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
    if wandb_mode != "disabled":
        wandb_id = wandb_id or uuid.uuid4().hex[:8]
        accelerator.init_trackers(
            cfg.logging.project,
            config=OmegaConf.to_container(cfg, resolve=True),
            init_kwargs={"wandb": {"id": wandb_id, "resume": "allow", "mode": wandb_mode, "dir": str(run_dir),
                                   "name": cfg.logging.run_name or run_dir.name}},
        )

    def save_checkpoint() -> Path:
        return checkpoints.save(step, {"step": step, "tokens_seen": tokens_seen, "wandb_id": wandb_id,
                                       "data": train_loader.state_dict(), "quant": converter.state_dict()})

    n_params = models.count_parameters(accelerator.unwrap_model(model))
    tokens_per_step = tcfg.global_batch_size * cfg.data.seq_len
    flops_per_token = models.matmul_flops_per_token(cfg.model, cfg.data.seq_len)
    peak_flops = device_peak_flops(accelerator.device)
    reporter.info(
        f"run {run_dir} | {n_params / 1e6:.1f}M params | precision {tcfg.precision} | quant: {converter.describe()} | "
        f"optimizer {cfg.optimizer.name} | {world} process(es) on {accelerator.device} | "
        f"{tcfg.global_batch_size} seq/step = {tcfg.micro_batch_size} x {world} x {accum_steps} accumulation"
    )
    results: dict[str, float] = {}
    if tcfg.eval_at_start and step == 0:
        results["initial_val_loss"] = evaluate(model, val_batches, accelerator)
        reporter.info(f"step 0 | val_loss {results['initial_val_loss']:.4f} | "
                      f"val_ppl {math.exp(results['initial_val_loss']):.2f}")
        reporter.log(0, {"val_loss": results["initial_val_loss"], "val_ppl": math.exp(results["initial_val_loss"])},
                     console=False)

    batches = iter(train_loader)
    reporter.start(step)
    while step < tcfg.max_steps:
        started = time.perf_counter()
        micro_batches = [{k: v.to(accelerator.device) for k, v in next(batches).items()} for _ in range(accum_steps)]
        global_targets = accelerator.reduce(sum(target_count(b) for b in micro_batches), reduction="sum")
        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for i, batch in enumerate(micro_batches):
            syncing = i == accum_steps - 1
            with contextlib.nullcontext() if syncing else accelerator.no_sync(model):
                micro_loss = token_loss_sum(model, batch)
                # DDP averages gradients over ranks, hence the world-size factor: the result is the
                # gradient of the token mean over the whole global batch.
                accelerator.backward(micro_loss * world / global_targets)
            loss_sum += micro_loss.detach().double()
        loss = (accelerator.reduce(loss_sum, reduction="sum") / global_targets).item()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), tcfg.grad_clip or math.inf).item()
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
            scheduler.step()
            skipped_in_a_row = 0
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        if not finite:
            last = checkpoints.latest()
            if tcfg.nonfinite_policy == "stop" or skipped_in_a_row + 1 > tcfg.max_consecutive_skips:
                raise NonFiniteLossError(
                    f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}; "
                    f"the last good checkpoint is {last or 'none (no checkpoint saved yet)'}. "
                    f"Lower optimizer.lr, enable trainer.grad_clip, or set trainer.nonfinite_policy=skip"
                )
            skipped_in_a_row += 1
            reporter.info(f"step {step}: non-finite loss/gradient, update skipped ({skipped_in_a_row} in a row)")

        elapsed = time.perf_counter() - started
        if step % tcfg.log_every == 0 or step == tcfg.max_steps or not finite:
            tokens_per_s = tokens_per_step / elapsed
            clipped = grad_norm * min(1.0, tcfg.grad_clip / (grad_norm + 1e-6)) if tcfg.grad_clip else grad_norm
            reporter.log(step, {
                "loss": loss, "ppl": math.exp(min(loss, 50.0)), "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm, "grad_norm_clipped": clipped, "tokens_seen": tokens_seen,
                "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * flops_per_token / (peak_flops * world) if peak_flops else None,
                "peak_mem_gib": peak_memory_gib(accelerator.device), "skipped_step": not finite,
                "data_skipped_lines": train_loader.skipped_lines,
            }, console=True)
        if step % tcfg.eval_every == 0 or step == tcfg.max_steps:
            val_loss = evaluate(model, val_batches, accelerator)
            results["val_loss"] = val_loss
            reporter.info(f"step {step} | val_loss {val_loss:.4f} | val_ppl {math.exp(val_loss):.2f}")
            reporter.log(step, {"val_loss": val_loss, "val_ppl": math.exp(val_loss)}, console=False)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 or step == tcfg.max_steps:
            save_checkpoint()
        if preemption.any_rank_signalled():
            path = save_checkpoint()
            if accelerator.is_main_process:
                (run_dir / PREEMPTED_MARKER).write_text(f"{path}\n")
            reporter.info(f"preemption signal received: saved {path}; run the same command to resume")
            reporter.close()
            finish(accelerator)
            sys.exit(PREEMPTED_EXIT_CODE)

    reporter.close()
    if cfg.checkpoint.export_hf and accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(run_dir / "hf")
    results["step"] = step
    if "val_loss" in results:
        start = f" (from {math.exp(results['initial_val_loss']):.2f} at step 0)" if "initial_val_loss" in results else ""
        reporter.info(f"done: {step} steps, validation perplexity {math.exp(results['val_loss']):.2f}{start} | {run_dir}")
    finish(accelerator)
    return results


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
