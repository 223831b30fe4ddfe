"""Optimizer: AdamW with decoupled weight decay on matrices only, the official learning-rate
schedules (LlamaGen constant, FlowAR/MAR warm-up + cosine, VAR's `lin0`), VAR's cosine
weight-decay schedule and grad clipping."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from arjax.config import check
from arjax.sharding import path_str

SCHEDULES = ("constant", "cosine", "lin0")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.05
    weight_decay_end: float = -1.0  # >= 0: cosine from weight_decay to it (VAR's twde)
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    warmup_steps: int = 0
    warmup_start: float = 0.0  # lr ratio at step 0 of the linear warm-up (VAR wp0: 0.005)
    end_ratio: float = 0.0  # lr ratio at the last step (VAR wpe), cosine and lin0
    schedule: str = "constant"  # constant (LlamaGen), cosine (FlowAR/MAR), lin0 (VAR)
    total_steps: int = 0  # horizon of cosine / lin0 and of the weight-decay schedule
    no_decay: tuple[str, ...] = ()  # parameter paths containing one of these: no decay (MAR)

    def validate(self, name: str = "optim") -> None:
        check(self.lr > 0, f"{name}.lr must be > 0, got {self.lr}")
        check(self.warmup_steps >= 0, f"{name}.warmup_steps must be >= 0")
        check(self.schedule in SCHEDULES,
              f"{name}.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        check(0 <= self.warmup_start <= 1 and 0 <= self.end_ratio <= 1,
              f"{name}.warmup_start and {name}.end_ratio must be in [0, 1]")
        check(self.schedule != "cosine" or self.total_steps > self.warmup_steps,
              f"{name}.schedule='cosine' needs {name}.total_steps > {name}.warmup_steps")
        check(self.schedule != "lin0" or self.total_steps > self.warmup_steps + 1,
              f"{name}.schedule='lin0' needs {name}.total_steps > {name}.warmup_steps + 1")
        check(self.weight_decay_end < 0 or self.total_steps > 1,
              f"{name}.weight_decay_end needs {name}.total_steps > 1 (its cosine horizon)")


def learning_rate(cfg: OptimConfig) -> optax.Schedule:
    """The lr at each optimizer step (0-based, the count optax keeps)."""
    peak, warm = cfg.lr, cfg.warmup_steps
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(cfg.warmup_start * peak, peak, max(warm, 1),
                                                  cfg.total_steps, cfg.end_ratio * peak)
    if cfg.schedule == "lin0":
        return var_lin0(peak, warm, cfg.total_steps, cfg.warmup_start, cfg.end_ratio)
    return optax.join_schedules(
        [optax.linear_schedule(cfg.warmup_start * peak, peak, max(warm, 1)),
         optax.constant_schedule(peak)], [warm])


def var_lin0(peak: float, warmup: int, total: int, start: float, end: float
             ) -> optax.Schedule:
    """VAR's `lin0` (utils/lr_control.py): linear warm-up from start * peak, then peak for
    the first 5 % of the remaining steps, then linear to end * peak at step total - 1."""
    hold = 0.05

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm = start + (1 - start) * t / max(warmup, 1)
        passed = (t - warmup) / (total - 1 - warmup)
        decay = jnp.where(passed < hold, 1.0, end + (1 - end) * (1 - passed) / (1 - hold))
        return peak * jnp.where(t < warmup, warm, decay)

    return schedule


def weight_decay(cfg: OptimConfig) -> float | optax.Schedule:
    """Constant, or VAR's cosine from `weight_decay` to `weight_decay_end` over all steps."""
    if cfg.weight_decay_end < 0:
        return cfg.weight_decay
    start, end, last = cfg.weight_decay, cfg.weight_decay_end, cfg.total_steps - 1
    return lambda step: end + (start - end) * (0.5 + 0.5 * jnp.cos(
        math.pi * jnp.asarray(step, jnp.float32) / last))


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    cfg.validate()
    # Every family decays only >= 2-D tensors (no norms, no biases); MAR also skips its
    # diffusion MLP (`no_decay=("diffloss",)`).
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and not any(n in path_str(path) for n in cfg.no_decay),
        params)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2,
                             weight_decay=weight_decay(cfg), mask=decay_mask))
    return optax.chain(*parts)
