"""MAR sampling (`sample_tokens`): masked generation in a random order, a diffusion chain per
predicted token.

All L tokens start unknown, in a random order per sample. Step s of `num_iter` runs the trunk
on the known tokens (the batch doubled to [cond; null] with CFG), then predicts the tokens whose
place in the order lies in [m_{s+1}, m_s), where m_{s+1} = floor(L cos(pi/2 (s+1)/num_iter))
clamped to [1, m_s - 1] (MaskGIT's cosine schedule; the last step predicts all that remain).
Each predicted token runs the diffusion MLP's reverse chain (`diffusion_steps`, temperature
scaling the noise) with eps = eps_null + w (eps_cond - eps_null) and the cond half's variance,
w = 1 + (cfg - 1)(L - m_{s+1}) / L ("linear", Muse's) or cfg ("constant").

Static shapes: the mask counts are a host table, so every step gathers a fixed K = the largest
number of tokens any step predicts (rows past a step's count are computed and dropped); the
steps are one `lax.fori_loop`, each chain a `lax.scan`. Noise can be supplied (`noise`:
initial [B, L, C] and per-step [B, L, T, C] by token position, as CSpD's reference code
takes it) for parity tests; by default it is drawn per step from the key.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from arjax.config import check
from arjax.models import bind
from arjax.models.mar import diffusion, random_ranks
from arjax.sampling.common import cfg_combine, check_guidance
from arjax.sampling.generator import Samples


@dataclasses.dataclass(frozen=True)
class MARSampleConfig:
    num_iter: int = 64  # generation steps (the official FID protocol: 256)
    cfg: float = 1.0  # guidance weight w; 1 = off
    cfg_schedule: str = "linear"  # linear: w grows with the share of known tokens
    temperature: float = 1.0  # tau: scales the diffusion chain's noise
    diffusion_steps: int = 100  # respaced reverse-chain steps per token

    def validate(self, seq_len: int | None = None) -> None:
        check(self.num_iter >= 1, f"sample.num_iter must be >= 1, got {self.num_iter}")
        check_guidance(self.cfg, self.cfg_schedule)
        check(self.temperature >= 0, f"sample.temperature must be >= 0, got "
              f"{self.temperature}")
        check(1 <= self.diffusion_steps <= 1000, f"sample.diffusion_steps must be in "
              f"[1, 1000], got {self.diffusion_steps}")
        if seq_len is not None:
            check(self.num_iter <= seq_len, f"sample.num_iter={self.num_iter} must be <= "
                  f"the {seq_len} tokens (a step predicts at least one)")


def mask_schedule(seq_len: int, num_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """(m [num_iter + 1]: unknown tokens before each step and after the last,
    first [num_iter]: the first order place predicted at each step). Step s predicts the
    places first[s]..m[s] - 1."""
    m = [seq_len]
    for s in range(num_iter):
        nxt = math.floor(seq_len * np.cos(math.pi / 2.0 * (s + 1) / num_iter))
        m.append(max(1, min(m[-1] - 1, nxt)))
    m = np.asarray(m, np.int32)
    first = np.append(m[1:-1], 0).astype(np.int32)
    return m, first


def sample_latents(graphdef, params, key: jax.Array, labels: jax.Array, cfg: MARSampleConfig,
                   noise: tuple[jax.Array, jax.Array] | None = None, ranks: jax.Array | None
                   = None) -> tuple[jax.Array, dict]:
    """labels int [B] -> (latents [B, s, s, C] scaled, stats). `ranks` [B, L]: each
    position's place in the order (default: random from `key`)."""
    model = bind(graphdef, params)
    mcfg = model.cfg
    length, c = mcfg.seq_len, mcfg.token_dim
    cfg.validate(length)
    batch, guided = labels.shape[0], cfg.cfg != 1
    k_order, k_noise = jax.random.split(key)
    if ranks is None:
        ranks = random_ranks(k_order, batch, length)
    order = jnp.argsort(ranks, axis=-1)
    m, first = mask_schedule(length, cfg.num_iter)
    width = int(np.max(m[:-1] - first))  # K: tokens gathered per step
    weights = (1 + (cfg.cfg - 1) * (length - m[1:]) / length if cfg.cfg_schedule == "linear"
               else np.full(cfg.num_iter, cfg.cfg))
    m, first, weights = jnp.asarray(m), jnp.asarray(first), jnp.asarray(weights, jnp.float32)
    cond = model.conditioning(labels.astype(jnp.int32))
    if guided:
        cond = jnp.concatenate([cond, model.conditioning(labels, jnp.ones_like(labels, bool))])
    double = (lambda a: jnp.concatenate([a, a])) if guided else (lambda a: a)
    process = diffusion(cfg.diffusion_steps)
    steps, rows = process.steps, jnp.arange(batch)[:, None]

    def step(s, tokens):
        z = model(double(tokens), double(ranks >= m[s]), cond)
        place = first[s] + jnp.arange(width)
        valid = place < m[s]
        idx = jnp.take_along_axis(order, jnp.broadcast_to(jnp.minimum(place, length - 1),
                                                          (batch, width)), axis=1)
        zc = model.diffloss.condition(jnp.take_along_axis(z, double(idx)[..., None], axis=1))
        zc = zc.reshape(-1, zc.shape[-1])
        if noise is None:
            drawn = jax.random.normal(jax.random.fold_in(k_noise, s),
                                      (1 + steps, batch * width, c))
            init, inter = drawn[0], drawn[1:]
        else:
            init = jnp.asarray(noise[0])[rows, idx].reshape(-1, c)
            inter = jnp.moveaxis(jnp.asarray(noise[1])[rows, idx], 2, 0).reshape(steps, -1, c)

        def net(x, t):
            out = model.diffloss.denoise(double(x), double(t), zc)
            if not guided:
                return out
            (eps_c, var_c), (eps_u, _) = (jnp.split(h, 2, -1) for h in jnp.split(out, 2))
            return jnp.concatenate([cfg_combine(eps_c, eps_u, weights[s]), var_c], -1)

        # the chain draws noise[i] at step i (i = T-1 .. 1): inter[T - 1 - i] is its i-th draw
        new = process.sample(net, init, inter[::-1], cfg.temperature)
        return tokens.at[rows, jnp.where(valid, idx, length)].set(
            new.reshape(batch, width, c).astype(tokens.dtype), mode="drop")

    tokens = jax.lax.fori_loop(0, cfg.num_iter, step, jnp.zeros((batch, length, c)))
    stats = {"target_passes": jnp.int32(cfg.num_iter),
             "nfe": jnp.int32(cfg.num_iter * steps)}
    return tokens.reshape(batch, mcfg.side, mcfg.side, c), stats


def sample(graphdef, params, vae_graphdef, vae_params, key: jax.Array, labels: jax.Array,
           cfg: MARSampleConfig, latent_scale: float,
           noise: tuple[jax.Array, jax.Array] | None = None) -> Samples:
    """labels int [B] -> Samples(images [B, H, W, 3] in [-1, 1], {"latents": scaled latents},
    {"target_passes": trunk passes, "nfe": diffusion-MLP calls per token chain x steps})."""
    latents, stats = sample_latents(graphdef, params, key, labels, cfg, noise)
    images = bind(vae_graphdef, vae_params).decode(latents, latent_scale)
    return Samples(images, {"latents": latents}, stats)
