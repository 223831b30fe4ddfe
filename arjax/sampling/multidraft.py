"""Multi-draft verification: SpecTr's k-sequential selection and the optimal acceptance bound.

With n i.i.d. drafts X_1..X_n ~ q at one position, SpecTr (Sun et al. 2023) accepts X_i with
probability min(1, p(X_i) / (rho q(X_i))), in order, and otherwise draws from

    p_res = [p - min(q, p / rho) (1 - (1 - beta)^n) / beta] / (1 - beta)^n,
    beta(rho) = sum_x min(q(x), p(x) / rho),

which outputs exactly p when rho >= (1 - (1 - beta)^n) / beta; rho* solving the equality
maximises the acceptance 1 - (1 - beta)^n (at least (1 - 1/e) of the optimum). n = 1 gives
standard speculative sampling. `optimal_acceptance` is the best any verifier can do with n
i.i.d. drafts (Hu et al. 2025): a min-cut whose minimum lies on a prefix of the tokens sorted
by p / q, so it costs one sort.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _beta(p, q, rho):
    return jnp.sum(jnp.minimum(q, p / rho[..., None]), -1)


def _selection_mass(beta, n):
    """(1 - (1 - beta)^n) / beta, the limit n at beta = 0."""
    return jnp.where(beta > 0, (1 - (1 - beta) ** n) / jnp.where(beta > 0, beta, 1.0), n)


def optimal_rho(p: jax.Array, q: jax.Array, n: jax.Array, iters: int = 40) -> jax.Array:
    """rho* in [1, n] for rows p, q [.., V] and draft counts n [..] (bisection)."""
    n = jnp.broadcast_to(jnp.asarray(n, p.dtype), p.shape[:-1])
    lo, hi = jnp.ones_like(n), jnp.maximum(n, 1.0)

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        valid = _selection_mass(_beta(p, q, mid), n) <= mid
        return jnp.where(valid, lo, mid), jnp.where(valid, mid, hi)

    return jax.lax.fori_loop(0, iters, step, (lo, hi))[1]  # hi stays on the valid side


def kseq_acceptance(p: jax.Array, q: jax.Array, n) -> jax.Array:
    """P(one of n i.i.d. drafts is accepted) under K-SEQ at rho*."""
    n = jnp.asarray(n, p.dtype)
    return 1 - (1 - _beta(p, q, optimal_rho(p, q, n))) ** n


def kseq_accept_probs(p, q, drafts, rho):
    """min(1, p(X_i) / (rho q(X_i))) for drafts int [.., n] -> [.., n]."""
    px = jnp.take_along_axis(p, drafts, -1)
    qx = jnp.take_along_axis(q, drafts, -1)
    return jnp.where(qx > 0, jnp.minimum(1.0, px / (rho[..., None] * jnp.where(qx > 0, qx, 1))),
                     1.0)


def kseq_residual(p, q, n, rho):
    """Unnormalised p_res (times (1 - beta)^n), clipped at 0 against rounding."""
    beta = _beta(p, q, rho)
    return jnp.maximum(p - jnp.minimum(q, p / rho[..., None])
                       * _selection_mass(beta, n)[..., None], 0.0)


def optimal_acceptance(p: jax.Array, q: jax.Array, n) -> jax.Array:
    """alpha* = min_H [p(V \\ H) + 1 - (1 - q(H))^n] over prefixes H of tokens sorted by
    p / q descending: the largest P(target sample is among n i.i.d. drafts from q)."""
    ratio = jnp.where(q > 0, p / jnp.where(q > 0, q, 1.0), jnp.inf)
    order = jnp.argsort(-ratio, axis=-1)
    cp = jnp.cumsum(jnp.take_along_axis(p, order, -1), -1)
    cq = jnp.minimum(jnp.cumsum(jnp.take_along_axis(q, order, -1), -1), 1.0)
    cuts = (1 - cp) + 1 - (1 - cq) ** jnp.asarray(n, p.dtype)[..., None]
    return jnp.minimum(jnp.min(cuts, -1), 1.0)  # H = {} gives 1
