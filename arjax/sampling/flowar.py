"""FlowAR sampling: per scale one cached trunk call, then an ODE solve of the flow head.

Follows `sample_tokens` + `euler_sampler`: the batch is doubled to [cond; null] with
independent noise in each half; scale k of K guides with w_k = 1 + (cfg - 1) k / (K - 1)
(`cfg_schedule` "linear", the official ramp: no guidance at the first scale), and only
while t <= `guidance` (guidance_high): there the cond
half's state is fed to both halves and both take v_null + w_k (v_cond - v_null); elsewhere each
half follows its own velocity. The cond half's result, bicubic -> latent side -> area -> next
side, is the next scale's input (for both halves). DiSA (Zhao et al. 2025) anneals the number
of flow steps linearly from `num_steps` at the first scale to `disa_min_steps` at the last:
late scales start from a well-determined condition and need fewer steps. cfg = 1 runs the
unguided batch alone (the official code crashes there). Each scale is unrolled (static
shapes), the ODE is a `lax.scan`, the VAE decoder runs in the same jit.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from arjax.config import check
from arjax.models import bind
from arjax.models.flowar import next_input
from arjax.nn.resize import resize
from arjax.sampling import ode
from arjax.sampling.common import cfg_combine, cfg_weight, check_guidance, doubled_rows
from arjax.sampling.generator import Samples


@dataclasses.dataclass(frozen=True)
class FlowSampleConfig:
    num_steps: int = 25  # flow steps at the first scale (and every scale without DiSA)
    solver: str = "euler"  # euler | heun
    grid: str = "official"  # official (FlowAR's two-piece grid) | uniform
    cfg: float = 4.3  # guidance weight at the last scale; 1 = no CFG
    cfg_schedule: str = "linear"  # the official ramp from 1 at the first scale
    guidance: float = 0.9  # guide only while t <= guidance (guidance_high)
    disa_min_steps: int = 0  # DiSA: steps at the last scale (linear in between); 0 = off

    def validate(self) -> None:
        check(self.num_steps >= 2, f"sample.num_steps must be >= 2, got {self.num_steps}")
        check(self.solver in ode.SOLVERS, f"sample.solver must be one of {ode.SOLVERS}, got "
              f"{self.solver!r}")
        check(self.grid in ode.GRIDS, f"sample.grid must be one of {ode.GRIDS}, got "
              f"{self.grid!r}")
        check_guidance(self.cfg, self.cfg_schedule)
        check(0 <= self.guidance <= 1, f"sample.guidance must be in [0, 1], got "
              f"{self.guidance}")
        check(self.disa_min_steps == 0 or 2 <= self.disa_min_steps <= self.num_steps,
              f"sample.disa_min_steps must be 0 (off) or in [2, num_steps], got "
              f"{self.disa_min_steps}")

    def steps(self, num_scales: int) -> list[int]:
        """Flow steps asked for at each scale."""
        if not self.disa_min_steps or num_scales == 1:
            return [self.num_steps] * num_scales
        frac = np.arange(num_scales) / (num_scales - 1)
        steps = self.num_steps + (self.disa_min_steps - self.num_steps) * frac
        return [int(np.floor(s + 0.5)) for s in steps]

    def grids(self, num_scales: int) -> list[np.ndarray]:
        return [ode.time_grid(n, self.grid) for n in self.steps(num_scales)]


def _scale(model, cfg: FlowSampleConfig, x, cond, cache, k: int, key: jax.Array, batch: int):
    """Scale k: one cached trunk call over the (doubled) input x, then the flow head's ODE
    -> (level [B, n, n, C], next scale's trunk input or None, cache, head calls)."""
    mcfg, guided = model.cfg, cfg.cfg != 1
    scales, n = mcfg.scales, mcfg.scales[k]
    grid, rope = cfg.grids(len(scales))[k], jnp.asarray(model.head_ropes[k])
    z, cache = model.decode_scale(x, cond, cache, k)
    ctx = model.flownet.context(z, rope)
    w = cfg_weight(cfg.cfg, cfg.cfg_schedule, k, len(scales))

    def velocity(xt, t, flag):
        if not guided:
            return model.flownet.velocity(xt, jnp.full((batch,), t), ctx, rope)
        inp = jnp.where(flag, jnp.concatenate([xt[:batch], xt[:batch]]), xt)
        v = model.flownet.velocity(inp, jnp.full((2 * batch,), t), ctx, rope)
        g = cfg_combine(v[:batch], v[batch:], w)
        return jnp.where(flag, jnp.concatenate([g, g]), v)

    flags = (w != 1) & (grid[:-1] <= cfg.guidance)
    k_cond, k_null = jax.random.split(jax.random.fold_in(key, k))
    noise = jax.random.normal(k_cond, (batch, n * n, mcfg.token_dim))
    if guided:  # the cond half's noise does not depend on whether CFG is on
        noise = jnp.concatenate([noise, jax.random.normal(k_null, noise.shape)])
    tokens, calls = ode.integrate(velocity, noise, grid, cfg.solver, flags)
    level = tokens[:batch].reshape(batch, n, n, -1)
    nxt = None
    if k + 1 < len(scales):
        nxt = next_input(level, mcfg.side, scales[k + 1])
        nxt = model.embed(None, jnp.concatenate([nxt, nxt]) if guided else nxt, k + 1)
    return level, nxt, cache, calls


def _conditioning(model, labels: jax.Array, guided: bool) -> jax.Array:
    rows = labels.astype(jnp.int32)
    if guided:
        rows = jnp.concatenate([rows, jnp.full_like(rows, model.cfg.num_classes)])
    return model.class_emb(rows)


def sample_latents(graphdef, params, key: jax.Array, labels: jax.Array,
                   cfg: FlowSampleConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """labels int [B] -> (scaled latents [B, s, s, C], {"target_passes": trunk calls, "nfe":
    flow-head evaluations per sample, CFG's doubled batch counted once})."""
    model = bind(graphdef, params)
    cfg.validate()
    cond = _conditioning(model, labels, cfg.cfg != 1)
    cache = model.init_cache(cond.shape[0])
    x = model.embed(cond, None, 0)
    passes = nfe = jnp.zeros((), jnp.int32)
    for k in range(len(model.cfg.scales)):
        level, x, cache, calls = _scale(model, cfg, x, cond, cache, k, key, labels.shape[0])
        passes, nfe = passes + 1, nfe + calls
    return level, {"target_passes": passes, "nfe": nfe}


@functools.partial(jax.jit, static_argnames=("graphdef", "vae_graphdef", "k", "cfg",
                                             "latent_scale", "decode"))
def _scale_step(graphdef, params, vae_graphdef, vae_params, state: dict, labels, key, k: int,
                cfg: FlowSampleConfig, latent_scale: float, decode: bool):
    """Scale k for the candidates `labels` -> (state, images of this scale's level brought to
    the latent side (bicubic) and decoded, or None; counted cost)."""
    model = bind(graphdef, params)
    guided, batch = cfg.cfg != 1, labels.shape[0]
    cond = _conditioning(model, labels, guided)
    level, x, cache, calls = _scale(model, cfg, state["x"], cond, state["cache"], k, key,
                                    batch)
    rows, n = batch * (2 if guided else 1), model.cfg.scales[k]
    cost = {"token_passes": jnp.int32(state["x"].shape[0] * state["x"].shape[1]),
            "head_token_passes": calls * rows * n * n}
    images = None
    if decode:
        latents = resize(level, model.cfg.side, "bicubic")
        images = bind(vae_graphdef, vae_params).decode(latents, latent_scale)
    return {"cache": cache, "x": state["x"] if x is None else x, "level": level}, images, cost


@dataclasses.dataclass(frozen=True)
class Candidates:
    """FlowAR decoded one scale at a time for a batch of candidates (`sampling.search`): the
    state is the trunk's KV caches of both CFG halves, the next input and the last level."""
    graphdef: object
    params: object
    vae_graphdef: object
    vae_params: object
    cfg: FlowSampleConfig
    latent_scale: float

    def __post_init__(self):
        self.cfg.validate()

    @functools.cached_property
    def model(self):
        return bind(self.graphdef, self.params)

    @property
    def scales(self) -> int:
        return len(self.model.cfg.scales)

    def start(self, labels: jax.Array) -> dict:
        cond = _conditioning(self.model, labels, self.cfg.cfg != 1)
        return {"cache": self.model.init_cache(cond.shape[0]),
                "x": self.model.embed(cond, None, 0),
                "level": jnp.zeros((labels.shape[0], 1, 1, self.model.cfg.token_dim))}

    def step(self, state: dict, labels: jax.Array, key: jax.Array, k: int, decode: bool):
        return _scale_step(self.graphdef, self.params, self.vae_graphdef, self.vae_params,
                           state, labels, key, k, self.cfg, self.latent_scale, decode)

    def gather(self, state: dict, rows: jax.Array) -> dict:
        doubled = doubled_rows(rows, state["level"].shape[0], self.cfg.cfg != 1)
        return {"cache": jax.tree.map(lambda a: a[doubled], state["cache"]),
                "x": state["x"][doubled], "level": state["level"][rows]}

    def outputs(self, state: dict) -> dict:
        return {"latents": state["level"]}


def sample(graphdef, params, vae_graphdef, vae_params, key: jax.Array, labels: jax.Array,
           cfg: FlowSampleConfig, latent_scale: float) -> Samples:
    """labels int [B] -> Samples(images [B, H, W, 3] in [-1, 1], {"latents": scaled latents},
    {"target_passes", "nfe"})."""
    latents, stats = sample_latents(graphdef, params, key, labels, cfg)
    images = bind(vae_graphdef, vae_params).decode(latents, latent_scale)
    return Samples(images, {"latents": latents}, stats)
