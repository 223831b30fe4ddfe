"""Optimizer: AdamW with decoupled weight decay on matrices only, warm-up and grad clipping."""

from __future__ import annotations

import dataclasses

import jax
import optax

from arjax.config import check


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.05
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    warmup_steps: int = 0
    schedule: str = "constant"  # "constant" (LlamaGen) or "cosine"
    total_steps: int = 0  # cosine horizon

    def validate(self, name: str = "optim") -> None:
        check(self.lr > 0, f"{name}.lr must be > 0, got {self.lr}")
        check(self.warmup_steps >= 0, f"{name}.warmup_steps must be >= 0")
        check(self.schedule in ("constant", "cosine"),
              f"{name}.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        check(self.schedule != "cosine" or self.total_steps > self.warmup_steps,
              f"{name}.schedule='cosine' needs {name}.total_steps > {name}.warmup_steps")


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    cfg.validate()
    if cfg.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1),
                                                cfg.total_steps)
    else:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1)),
             optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
    # LlamaGen/VAR decay only >= 2-D tensors (no norms, no biases).
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)
