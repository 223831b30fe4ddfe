"""Sampling configuration, logit filters and classifier-free guidance shared by all samplers.

Conventions follow LlamaGen's `generate`: temperature first, then top-k (ties with the k-th
logit kept), then top-p (HF-style: the smallest prefix of the sorted distribution whose mass
reaches p, always at least one token).

Guidance has one vocabulary in every family: `cfg` is the weight w of
`uncond + w (cond - uncond)` (1 = off, the batch is not doubled), and `cfg_schedule` is
"constant" (w at every step) or "linear" (1 at the first step/scale ramping to w at the last:
VAR's and FlowAR's official ramp). VAR's official `cfg=1.5` is w = 2.5 here.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from arjax.config import check

CFG_SCHEDULES = ("constant", "linear")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    cfg: float = 1.0  # guidance weight; 1 = no guidance (batch not doubled)
    cfg_schedule: str = "constant"  # "linear": the weight ramps 1 -> cfg over the sequence
    cfg_interval: int = -1  # LlamaGen: guidance off after this many tokens; -1 = never
    segments: int = 4  # raster and speculative samplers: runs of steps, each compiled with a
    # KV cache that ends where the run does (attention reads about the filled part; compile
    # time grows with it)

    def validate(self, vocab_size: int) -> None:
        check(self.temperature >= 0, f"sample.temperature must be >= 0, got {self.temperature}")
        check(self.segments >= 1, f"sample.segments must be >= 1, got {self.segments}")
        check(0 <= self.top_k <= vocab_size,
              f"sample.top_k={self.top_k} must be in [0, vocab_size={vocab_size}] (0 = off)")
        check(0 < self.top_p <= 1, f"sample.top_p must be in (0, 1], got {self.top_p}")
        check_guidance(self.cfg, self.cfg_schedule)

    @property
    def uses_cfg(self) -> bool:
        return self.cfg != 1.0


def step_runs(start: int, stop: int, count: int) -> list[tuple[int, int]]:
    """Steps start..stop-1 as up to `count` runs (begin, end) of about equal length: the loops
    a sampler compiles with shapes of their own."""
    edges = np.unique(np.linspace(start, stop, count + 1).round().astype(int))
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def check_guidance(cfg: float, schedule: str) -> None:
    """The guidance fields every family's sample config has."""
    check(cfg >= 0, f"sample.cfg (guidance weight, 1 = off) must be >= 0, got {cfg}")
    check(schedule in CFG_SCHEDULES,
          f"sample.cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")


def cfg_weight(cfg: float, schedule: str, step, num_steps: int):
    """Guidance weight at (0-based) step/scale `step` of `num_steps` (a Python number for a
    static step, an array for a traced one; "constant" is the scalar `cfg` at every step)."""
    if schedule == "linear":
        return 1.0 + (cfg - 1.0) * step / max(num_steps - 1, 1)
    return cfg


class SampleStats(NamedTuple):
    target_passes: jax.Array  # int32 scalar: sequential model calls, counted in the loop
    logprob: jax.Array  # float32 [B]: sum of log p(sampled token) under the sampled dist


def _ordered_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 in the same order (sign-flipped bit patterns)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest_key(keys: jax.Array, holds) -> jax.Array:
    """The largest uint32 K [..., 1] with `holds(K)`, for a `holds` that is true from 0 up to
    some K and false above: set bit by bit from the top, 32 passes over the last axis."""
    def bit(i, k):
        candidate = k | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(holds(candidate), candidate, k)

    return jax.lax.fori_loop(0, 32, bit, jnp.zeros(keys.shape[:-1] + (1,), jnp.uint32))


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Masks (to -inf) logits outside top-k and outside the top-p nucleus. logits [..., V].

    Both cut-offs are found by a radix select on the logits' ordered bit patterns (32
    vectorised passes over the vocabulary) rather than a sort: XLA:CPU's sort handled about
    one element per microsecond, which made VAR-d16's top-k the largest op of its batch-8
    sampling (docs/benchmarks.md, issue 14). Ties with a cut-off are kept. The nucleus keeps
    every token whose strictly larger tokens hold at most `top_p` of the mass, i.e. the tokens
    at or above the largest value whose tokens at or above it hold more than `top_p`."""
    keys = _ordered_keys(logits)
    if top_k > 0:
        kth = _largest_key(keys, lambda k: jnp.sum(keys >= k, -1, keepdims=True) >= top_k)
        logits = jnp.where(keys < kth, -jnp.inf, logits)
    if top_p < 1.0:
        probs = jax.nn.softmax(logits, axis=-1)
        edge = _largest_key(keys, lambda k: jnp.sum(jnp.where(keys >= k, probs, 0.0), -1,
                                                    keepdims=True) > top_p)
        logits = jnp.where(keys < edge, -jnp.inf, logits)
    return logits


def cfg_scale_at(cfg: SampleConfig, step: jax.Array, num_steps: int) -> jax.Array:
    """Guidance weight for (0-based) step `step` of `num_steps`, with LlamaGen's interval."""
    scale = jnp.asarray(cfg_weight(cfg.cfg, cfg.cfg_schedule, step, num_steps), jnp.float32)
    if cfg.cfg_interval >= 0:
        scale = jnp.where(step > cfg.cfg_interval, 1.0, scale)
    return scale


def cfg_combine(cond: jax.Array, uncond: jax.Array, scale: jax.Array) -> jax.Array:
    """u + (c - u) * scale: LlamaGen's guided logits."""
    return uncond + (cond - uncond) * scale


def guided_logits(logits: jax.Array, cfg: SampleConfig, step, num_steps: int) -> jax.Array:
    """[2B,V] logits of the doubled batch [cond; uncond] -> [B,V] guided logits.

    `step` is a scalar, or int [B] when rows are at different positions (speculative)."""
    if not cfg.uses_cfg:
        return logits
    cond, uncond = jnp.split(logits, 2, axis=0)
    scale = cfg_scale_at(cfg, step, num_steps)
    return cfg_combine(cond, uncond, scale[..., None] if scale.ndim else scale)


def processed_logits(logits: jax.Array, cfg: SampleConfig) -> jax.Array:
    """The logits a token is drawn from: temperature (> 0), then top-k / top-p."""
    return filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)


def sample_token(key: jax.Array, logits: jax.Array, cfg: SampleConfig
                 ) -> tuple[jax.Array, jax.Array]:
    """logits [B,V] -> (token int32 [B], log p(token) [B]) after temperature/top-k/top-p."""
    if cfg.temperature == 0:
        token = jnp.argmax(logits, axis=-1)
        return token.astype(jnp.int32), jnp.zeros(logits.shape[:-1], jnp.float32)
    logits = processed_logits(logits, cfg)
    token = jax.random.categorical(key, logits, axis=-1)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)
    return token.astype(jnp.int32), logp[:, 0]


def doubled_rows(rows: jax.Array, batch: int, guided: bool) -> jax.Array:
    """Candidate rows -> their rows in a CFG-doubled [cond; null] batch of `batch` pairs."""
    return jnp.concatenate([rows, rows + batch]) if guided else rows
