"""Distilled Decoding's token flow (DD1, arXiv 2412.17153): a deterministic map from one
Gaussian vector to one token whose law is exactly the teacher's categorical distribution.

The token is a point of code space: the target is pi_0 = sum_j p_j delta(c_j) over the
codebook vectors c_j, the source N(0, I_C), the path the straight line
x_t = (1 - t) x_0 + t eps (t = 1 noise, t = 0 data). Everything is closed form:

    posterior weights   w_j ∝ p_j exp(-|x - (1 - t) c_j|^2 / (2 t^2))
    denoiser            m = sum_j w_j c_j                 (E[x_0 | x_t = x])
    velocity            v = (x - m) / t                   (E[eps - x_0 | x_t = x])
    score               s = -(x - (1 - t) m) / t^2

Integrating dx/dt = v from t = 1 down to t_min (Heun on a uniform-then-geometric grid: close
codes are told apart late, at t ~ their distance) ends next to one code; the token is the
argmax of the weights there. By the continuity equation the push-forward of N(0, I) is p, up
to the solver's error, which lives only next to the boundaries between token regions.

The weights use the expanded square (|x|^2 dropped: it is the same for every j), so one
evaluation is one [.., C] x [C, V] product, never a [.., V, C] broadcast.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from arjax.config import check

_HIGHEST = jax.lax.Precision.HIGHEST  # logits scale like 1/t^2: no reduced-precision matmul


def time_grid(uniform: int = 32, geometric: int = 96, t_mid: float = 0.1,
              t_min: float = 1e-4) -> np.ndarray:
    """Flow times from 1 down to `t_min`: `uniform` equal steps to `t_mid`, then `geometric`
    steps of equal ratio (128 Heun steps by default: the resolution near t = 0 decides codes
    closer than t_mid)."""
    check(uniform >= 1 and geometric >= 0 and 0 < t_min < t_mid < 1,
          f"flow grid needs uniform >= 1, geometric >= 0 and 0 < t_min < t_mid < 1, got "
          f"{uniform}, {geometric}, {t_mid}, {t_min}")
    head = np.linspace(1.0, t_mid, uniform + 1)
    tail = np.geomspace(t_mid, t_min, geometric + 1)[1:]
    return np.concatenate([head, tail]).astype(np.float32)


def posterior_logits(x: jax.Array, t, logp: jax.Array, codebook: jax.Array) -> jax.Array:
    """log w_j + const: x [..., C], logp [..., V] (-inf for filtered tokens), codebook [V, C]
    -> [..., V]."""
    dot = jnp.einsum("...c,vc->...v", x, codebook, precision=_HIGHEST)
    sq = jnp.sum(codebook * codebook, axis=-1)
    return logp + ((1 - t) * dot - 0.5 * (1 - t) ** 2 * sq) / t**2


def denoise(x: jax.Array, t, logp: jax.Array, codebook: jax.Array) -> jax.Array:
    """E[x_0 | x_t = x]: the posterior mean of the code vector."""
    w = jax.nn.softmax(posterior_logits(x, t, logp, codebook), axis=-1)
    return jnp.einsum("...v,vc->...c", w, codebook, precision=_HIGHEST)


def velocity(x: jax.Array, t, logp: jax.Array, codebook: jax.Array) -> jax.Array:
    """dx/dt of the probability-flow ODE at time t > 0."""
    return (x - denoise(x, t, logp, codebook)) / t


def score(x: jax.Array, t, logp: jax.Array, codebook: jax.Array) -> jax.Array:
    """grad_x log p_t(x), p_t = sum_j p_j N((1 - t) c_j, t^2 I)."""
    return -(x - (1 - t) * denoise(x, t, logp, codebook)) / t**2


def flow_tokens(noise: jax.Array, logits: jax.Array, codebook: jax.Array,
                grid: jax.Array | np.ndarray | None = None, solver: str = "heun"
                ) -> tuple[jax.Array, jax.Array]:
    """noise [..., C] and the teacher's processed logits [..., V] (after guidance,
    temperature and top-k / top-p: exactly what the categorical sampler draws from) ->
    (tokens int32 [...], the ODE's end state [..., C]). Deterministic; the flow is float32
    whatever the teacher's dtype."""
    check(solver in ("heun", "euler"), f"flow solver must be 'heun' or 'euler', got {solver!r}")
    grid = jnp.asarray(time_grid() if grid is None else grid, jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    codebook = codebook.astype(jnp.float32)

    def step(x, times):
        t, t_next = times
        v = velocity(x, t, logp, codebook)
        if solver == "heun":
            v = 0.5 * (v + velocity(x + (t_next - t) * v, t_next, logp, codebook))
        return x + (t_next - t) * v, None

    x, _ = jax.lax.scan(step, noise.astype(jnp.float32), (grid[:-1], grid[1:]))
    tokens = jnp.argmax(posterior_logits(x, grid[-1], logp, codebook), axis=-1)
    return tokens.astype(jnp.int32), x


class FlowDraw(NamedTuple):
    """What turns a sampler into DD1's flow map: each position's token comes from its own
    noise vector through `flow_tokens` instead of a categorical draw (`raster.sample`,
    `var.sample`); the map is a deterministic function of (noise, labels)."""
    noise: jax.Array  # [B, L, C]: one N(0, I) vector per token position, in token order
    codebook: jax.Array  # [V, C]: the vectors the tokens stand for
    grid: jax.Array  # flow times 1 -> t_min (`time_grid`)

    def draw(self, logits: jax.Array, noise: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Processed logits [B, (n,) V] and the positions' noise [B, (n,) C] -> (tokens,
        log p(token) under the processed distribution)."""
        tokens, _ = flow_tokens(noise, logits, self.codebook, self.grid)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[..., None],
                                   axis=-1)[..., 0]
        return tokens, logp


def gaussian_noise(key: jax.Array, ids: jax.Array, length: int, dim: int) -> jax.Array:
    """The noise of examples `ids` [B]: N(0, I) [B, L, C] from fold_in(key, id), so a pair
    data set stores token ids and regenerates its noise (same on any device count)."""
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (length, dim)))(
        ids.astype(jnp.uint32))
