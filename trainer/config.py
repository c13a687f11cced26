"""Typed schemas for the top-level run config.

Each package registers the schemas of its own Hydra group (`models`, `data`, `quant`,
`stablespam`); this module owns the trainer, checkpoint and logging sections and the root node, so a
misspelled key or a wrong type anywhere fails at composition time with Hydra's message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TrainerConfig:
    max_steps: int = 20000
    warmup_steps: int = 2000
    global_batch_size: int = 512
    """Sequences per optimizer step, across all ranks and accumulation micro-steps."""
    micro_batch_size: int = 32
    """Sequences per forward pass on one rank."""
    precision: str = "bf16_mixed"
    """fp32 | bf16_mixed (fp32 master weights, bf16 autocast) | pure_bf16 (the papers' setting)."""
    lr_schedule: str = "cosine"
    """cosine (linear warmup, cosine down to min_lr_ratio; the papers') | linear | constant."""
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0
    """Global-norm clipping threshold; 0 disables it ("Adam+GradClip" uses 1.0)."""
    compile: bool = False
    eval_every: int = 1000
    eval_at_start: bool = False
    log_every: int = 10
    """Read metrics back from the device (one host sync) and log them every N steps."""
    seed: int = 42
    nonfinite_policy: str = "stop"
    """stop: end the run with a message (the last checkpoint stays) | skip: drop the update, gated on
    the device (the step and its batch are used up; more than max_consecutive_skips in a row stop the
    run at the next logging step or save)."""
    max_consecutive_skips: int = 5
    spike_policy: str = "off"
    """off | skip: drop an update whose loss or grad norm is more than spike_z standard deviations above
    the mean of the last spike_window accepted steps (decided and applied on the device, see stablespam/gating.py)."""
    spike_z: float = 6.0
    spike_window: int = 100
    quant_error_every: int = 100
    """Log each quantized layer's weight and activation SQNR on the first logging step at or after
    every multiple of N (0 = never): one extra eval-mode forward of a micro-batch."""
    cpu: bool = False
    """Force CPU even when a GPU is visible."""
    parallelism: str = "ddp"
    """ddp (every rank holds the whole model) | fsdp2 (parameters, gradients and optimizer state sharded
    across the ranks by torch's `fully_shard`; the optimizers' statistics stay whole-tensor)."""


@dataclass
class CheckpointConfig:
    every: int = 1000
    """Save every N optimizer steps (0: only at the end and on preemption signals)."""
    keep_last: int = 2
    resume: bool = True
    """Resume automatically from the newest intact checkpoint in the run directory."""
    overwrite: bool = False
    """With resume=false: clear the run directory's checkpoints, metrics and export first (without it
    a run directory that holds checkpoints is refused, so an old run is never mixed with a new one)."""
    export_hf: bool = True
    """Write a `save_pretrained` export of the final model to <run_dir>/hf."""


@dataclass
class LoggingConfig:
    project: str = "stablespam"
    run_name: Optional[str] = None
    wandb_mode: Optional[str] = None
    """online | offline | disabled; None: $WANDB_MODE, else offline (works without an API key)."""
    progress: str = "auto"
    """auto (bar on a terminal, plain lines otherwise) | bar | lines."""


@dataclass
class RunConfig:
    model: Any = MISSING
    optimizer: Any = MISSING
    quant: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output_root: str = "outputs"
    run_dir: Optional[str] = None
    """Explicit run directory; default <output_root>/<SLURM job id or timestamp>."""


PRECISIONS = ("fp32", "bf16_mixed", "pure_bf16")
LR_SCHEDULES = ("cosine", "linear", "constant")
NONFINITE_POLICIES = ("stop", "skip")
SPIKE_POLICIES = ("off", "skip")
PARALLELISMS = ("ddp", "fsdp2")


class ConfigError(ValueError):
    """A config value that composes but cannot be run (inconsistent batch sizes, unknown mode)."""


def register_configs() -> None:
    import data
    import models
    import quant
    import stablespam

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=models.ModelConfig)
    data.register_configs(cs)
    quant.register_configs(cs)
    stablespam.register_configs(cs)


def check_run_config(cfg: Any, world_size: int) -> int:
    """Validate cross-field constraints; returns the gradient accumulation steps."""
    t = cfg.trainer
    if t.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={t.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if t.parallelism not in PARALLELISMS:
        raise ConfigError(f"trainer.parallelism={t.parallelism!r}: choose one of {', '.join(PARALLELISMS)}")
    if t.parallelism == "fsdp2" and t.compile:
        raise ConfigError("trainer.compile=true is not supported with trainer.parallelism=fsdp2; "
                          "set trainer.compile=false or trainer.parallelism=ddp")
    if t.parallelism == "fsdp2" and world_size < 2:
        raise ConfigError("trainer.parallelism=fsdp2 shards over processes but this run has one; launch it with "
                          "torchrun / accelerate launch, or use trainer.parallelism=ddp")
    if t.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"trainer.lr_schedule={t.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
    if t.nonfinite_policy not in NONFINITE_POLICIES:
        raise ConfigError(
            f"trainer.nonfinite_policy={t.nonfinite_policy!r}: choose one of {', '.join(NONFINITE_POLICIES)}"
        )
    if t.max_steps <= 0 or t.warmup_steps < 0 or t.warmup_steps > t.max_steps:
        raise ConfigError(
            f"need 0 <= trainer.warmup_steps ({t.warmup_steps}) <= trainer.max_steps ({t.max_steps}) and max_steps > 0"
        )
    if t.spike_policy not in SPIKE_POLICIES:
        raise ConfigError(f"trainer.spike_policy={t.spike_policy!r}: choose one of {', '.join(SPIKE_POLICIES)}")
    if "skip" in (t.spike_policy, t.nonfinite_policy) and cfg.optimizer.get("compile", False):
        raise ConfigError(
            "optimizer.compile=true cannot be combined with trainer.spike_policy=skip or trainer.nonfinite_policy="
            "skip: the device-gated step keeps per-tensor counters, so the compiled bucket step would recompile "
            "for every tensor; set optimizer.compile=false"
        )
    if t.quant_error_every < 0:
        raise ConfigError(f"trainer.quant_error_every={t.quant_error_every} must be >= 0 (0 = never)")
    if t.spike_z <= 0:
        raise ConfigError(f"trainer.spike_z={t.spike_z} must be > 0")
    for key, value in (("trainer.log_every", t.log_every), ("trainer.eval_every", t.eval_every),
                       ("trainer.spike_window", t.spike_window),
                       ("checkpoint.keep_last", cfg.checkpoint.keep_last)):
        if value <= 0:
            raise ConfigError(f"{key}={value} must be a positive number of steps")
    if cfg.checkpoint.every < 0:
        raise ConfigError(f"checkpoint.every={cfg.checkpoint.every} must be >= 0 (0: only at the end and on preemption)")
    if t.grad_clip < 0 or t.max_consecutive_skips < 0 or not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(
            f"need trainer.grad_clip >= 0 (got {t.grad_clip}), trainer.max_consecutive_skips >= 0 "
            f"(got {t.max_consecutive_skips}) and 0 <= trainer.min_lr_ratio <= 1 (got {t.min_lr_ratio})"
        )
    per_step = t.micro_batch_size * world_size
    if t.micro_batch_size <= 0 or t.global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} must be a multiple of "
            f"trainer.micro_batch_size={t.micro_batch_size} x {world_size} process(es) = {per_step}"
        )
    return t.global_batch_size // per_step
