"""Acceptance rules for one chain of drafts: exact, grouped (GSD), latent-relaxed (LANTERN).

A rule gives, for draft x drawn from q and target row p (both the guided, filtered
distributions [.., V]), the acceptance probability a(x) and the unnormalised residual the
correction token is drawn from after a rejection. All three reduce to the exact rule
(Leviathan et al.): a = min(1, p(x) / q(x)), residual (p - q)+, when their relaxation is off.

Shapes: p, q [B, K, V] and x int [B, K] for `accept`; [B, V] and [B] for `residual`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def _at(v: jax.Array, idx: jax.Array) -> jax.Array:
    """v [..., V] gathered at idx [..., n] -> [..., n]."""
    return jnp.take_along_axis(v, idx, axis=-1)


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """min(1, num / den), with 0 / 0 = 0 (a draft the proposal never makes is rejected)."""
    return jnp.where(den > 0, jnp.minimum(1.0, num / jnp.where(den > 0, den, 1.0)),
                     (num > 0).astype(num.dtype))


@dataclasses.dataclass(frozen=True)
class Exact:
    """Lossless: the output is distributed exactly as p."""

    def accept(self, p, q, x):
        return _ratio(_at(p, x[..., None])[..., 0], _at(q, x[..., None])[..., 0])

    def residual(self, p, q, x):
        return jnp.maximum(p - q, 0.0)


@dataclasses.dataclass(frozen=True)
class Grouped:
    """GSD (So et al. 2025): accept x with min(1, P(G) / Q(G)) for a dynamic group G(x).

    G(x) = x plus those of its rank neighbours under p (`window` below and window + 1 above
    in descending order; the official code uses 7 / 6 ascending) whose probability is within
    `p_threshold` of p(x) and, given `codes` [V, D] (the tokenizer's code vectors), whose
    squared code distance to x is below `dist_threshold`. The correction is the token-level
    residual (p - q)+, as in the official code. Relaxed: the output is not p; with window 0
    it is exactly the lossless rule.
    """

    window: int = 6
    p_threshold: float = 0.15
    dist_threshold: float = 0.5
    codes: jax.Array | None = None

    def group_masses(self, p, q, x):
        vocab = p.shape[-1]
        px, qx = _at(p, x[..., None])[..., 0], _at(q, x[..., None])[..., 0]
        if self.window == 0:
            return px, qx
        order = jnp.argsort(-p, axis=-1, stable=True)  # descending
        rank = jnp.sum(p > px[..., None], axis=-1)  # x's rank (first among ties)
        offsets = jnp.concatenate([jnp.arange(-self.window, 0),
                                   jnp.arange(1, self.window + 2)])
        ranks = rank[..., None] + offsets
        inside = (ranks >= 0) & (ranks < vocab)
        nb = _at(order, jnp.clip(ranks, 0, vocab - 1))
        keep = inside & (nb != x[..., None]) & (jnp.abs(_at(p, nb) - px[..., None])
                                                < self.p_threshold)
        if self.codes is not None:
            d2 = jnp.sum((self.codes[nb] - self.codes[x][..., None, :]) ** 2, -1)
            keep &= d2 < self.dist_threshold
        return (px + jnp.sum(jnp.where(keep, _at(p, nb), 0.0), -1),
                qx + jnp.sum(jnp.where(keep, _at(q, nb), 0.0), -1))

    def accept(self, p, q, x):
        return _ratio(*self.group_masses(p, q, x))

    def residual(self, p, q, x):
        return jnp.maximum(p - q, 0.0)


@dataclasses.dataclass(frozen=True)
class Relaxed:
    """LANTERN (Jang et al. 2025): the target mass of x's latent neighbours moves onto x.

    With `neighbours` int [V, k] (each code's nearest other codes, nearest first; see
    `nearest_codes`), A(x) is the longest prefix of x's neighbours whose total p mass stays
    within `delta`, p~_x = p with A(x)'s mass moved onto x, accept with min(1, p~_x(x) / q(x))
    and draw the correction from (p~_x - q)+ (the principled residual; the official code zeroes
    all k + 1 neighbours instead). TV(p~_x, p) = p(A(x)) <= delta, so for a draft fixed in
    advance the output is within delta of p in total variation; delta = 0 is the exact rule.
    """

    neighbours: jax.Array
    delta: float = 0.1

    def moved(self, p, x):
        """(neighbour ids [.., k], mask of A(x) [.., k], mass of A(x) [..])."""
        nb = self.neighbours[x]
        mass = _at(p, nb)
        in_a = jnp.cumsum(mass, axis=-1) <= self.delta
        return nb, in_a, jnp.sum(jnp.where(in_a, mass, 0.0), -1)

    def accept(self, p, q, x):
        _, _, extra = self.moved(p, x)
        return _ratio(_at(p, x[..., None])[..., 0] + extra, _at(q, x[..., None])[..., 0])

    def relaxed_target(self, p, x):
        """p~_x [B, V] for rows p [B, V] and drafts x [B]."""
        nb, in_a, extra = self.moved(p, x)
        drop = jax.vmap(lambda z, i, m: z.at[i].multiply(1.0 - m))(
            jnp.ones_like(p), nb, in_a.astype(p.dtype))
        return (p * drop).at[jnp.arange(p.shape[0]), x].add(extra)

    def residual(self, p, q, x):
        return jnp.maximum(self.relaxed_target(p, x) - q, 0.0)


def nearest_codes(codes: jax.Array, k: int, chunk: int = 1024) -> jax.Array:
    """int32 [V, k]: each code's k nearest other codes by squared L2, nearest first."""
    vocab = codes.shape[0]
    k = min(k, vocab - 1)
    sq = jnp.sum(codes**2, -1)

    def block(rows):
        ids, vecs = rows
        d2 = sq[ids][:, None] + sq[None] - 2 * vecs @ codes.T
        d2 = d2.at[jnp.arange(len(ids)), ids].set(jnp.inf)  # never its own neighbour
        return jax.lax.top_k(-d2, k)[1].astype(jnp.int32)

    pad = -vocab % chunk
    ids = jnp.pad(jnp.arange(vocab), (0, pad))
    vecs = jnp.pad(codes, ((0, pad), (0, 0)))
    out = jax.lax.map(block, (ids.reshape(-1, min(chunk, vocab + pad)),
                              vecs.reshape(-1, min(chunk, vocab + pad), codes.shape[1])))
    return out.reshape(-1, k)[:vocab]
