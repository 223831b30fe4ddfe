"""Draft sources for speculative sampling: a small draft GPT, or the target's own Jacobi samples.

A drafter has `init(batch, key, length) -> state` (room for positions < `length`),
`propose(state, prev, n, key) -> (state, drafts [B, k, K], q [B, k, K, V], draft model calls
made)`, `update(state, ...) -> state` (called after each round's commit) and `extend(state,
length) -> state` (room for positions < `length`: the sampler grows its caches run by run).
`q` is the exact law each draft was drawn from (the lossless rules need it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from arjax.nn.attention import extend_cache

JACOBI_INITS = ("uniform", "onehot", "left", "up")


def select_chain(tree, chain: jax.Array, batch: int, chains: int):
    """Copies each row's chosen chain (int [B]) over all its chains in a cache whose leading
    axis is [(cfg halves) x B x chains]."""
    def pick(x):
        y = x.reshape(-1, batch, chains, *x.shape[1:])
        idx = chain.reshape(1, batch, 1, *([1] * (x.ndim - 1)))
        return jnp.broadcast_to(jnp.take_along_axis(y, idx, axis=2), y.shape).reshape(x.shape)
    return jax.tree.map(pick, tree) if chains > 1 else tree


@dataclasses.dataclass(frozen=True)
class ModelDrafter:
    """k i.i.d. chains of K tokens from a small GPT, sampled from its guided, filtered
    distribution (`guide(logits [rows, V], pos [B*k]) -> [B*k, V]`). Runs K + 1 cached steps
    per round (the last only writes the K-th draft into its cache); rollback is implicit
    because every round writes from the row's committed length."""

    model: object  # bound RasterAR
    labels: jax.Array  # [rows]: chain labels (+ null labels under CFG)
    guide: Callable
    draft_len: int
    chains: int

    def init(self, batch: int, key, length: int):
        return self.model.init_cache(self.labels.shape[0], length)

    def extend(self, cache, length: int):
        return [extend_cache(c, length) for c in cache]

    def propose(self, cache, prev, n, key):
        batch, k, K = prev.shape[0], self.chains, self.draft_len
        rows = self.labels.shape[0]
        double = lambda x: jnp.concatenate([x] * (rows // (batch * k)), axis=0)
        pos0 = jnp.repeat(n, k)

        def step(i, carry):
            cache, prev, drafts, qs, calls = carry
            pos = pos0 + i
            logits, cache = self.model.decode(
                self.model.embed(double(prev[:, None]), self.labels, double(pos)), cache,
                double(pos))
            q = self.guide(logits[:, 0], pos)
            tok = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(q)).astype(jnp.int32)
            drafts = jax.lax.dynamic_update_slice_in_dim(drafts, tok[:, None], i, axis=1)
            qs = jax.lax.dynamic_update_slice_in_dim(qs, q[:, None], i, axis=1)
            return cache, tok, drafts, qs, calls + 1

        vocab = self.model.cfg.vocab_size
        init = (cache, jnp.repeat(prev, k), jnp.zeros((batch * k, K + 1), jnp.int32),
                jnp.zeros((batch * k, K + 1, vocab), jnp.float32), jnp.zeros((), jnp.int32))
        cache, _, drafts, qs, calls = jax.lax.fori_loop(0, K + 1, step, init)
        return (cache, drafts[:, :K].reshape(batch, k, K),
                qs[:, :K].reshape(batch, k, K, vocab), calls)

    def update(self, cache, *, chain, **_):
        return select_chain(cache, chain, chain.shape[0], self.chains)


@dataclasses.dataclass(frozen=True)
class JacobiDrafter:
    """Speculative Jacobi decoding (Teng et al. 2025): the drafts of the next window are the
    target's own samples from this window's rows that come after the accepted prefix (row i
    predicts position n + i, conditioned on the drafts before it), with q = that row's p.
    Slots left over are filled by `init`:

      uniform  a uniform random token recorded with q = 1/V (lossless; accepted with
               min(1, V p(x)), far more often than the official one-hot record)
      onehot   the official SJD: a uniform random token recorded as q = one-hot
      left/up  copy the token to the left / above in the image grid, q = one-hot
               (deterministic given the past, hence still lossless)
    """

    vocab: int
    grid: int
    draft_len: int
    init_kind: str = "uniform"

    def init(self, batch: int, key, length: int = 0):
        """All slots fresh, for positions 0..K-1 (no cache: `length` is unused)."""
        K = self.draft_len
        zeros = jnp.zeros((batch, K), jnp.int32)
        return self.fill(zeros, zeros[:, 0], zeros, jnp.zeros((batch, K, self.vocab)),
                         zeros.astype(bool), key)

    def extend(self, state, length: int):
        return state

    def propose(self, state, prev, n, key):
        return state, state[0][:, None], state[1][:, None], jnp.zeros((), jnp.int32)

    def fill(self, tokens, n, slots, qs, keep, key):
        """Replaces slots where ~keep [B, K] with fresh drafts for positions n + i."""
        batch, K = keep.shape
        rand = jax.random.randint(key, (batch, K), 0, self.vocab, jnp.int32)
        uniform = jnp.full((batch, K, self.vocab), 1.0 / self.vocab)
        q_rand = jax.nn.one_hot(rand, self.vocab) if self.init_kind == "onehot" else uniform
        if self.init_kind in ("uniform", "onehot"):
            return (jnp.where(keep, slots, rand), jnp.where(keep[..., None], qs, q_rand))
        offset = 1 if self.init_kind == "left" else self.grid
        for i in range(K):  # static, K is small: each slot may copy an earlier slot
            src = n + i - offset
            if i >= offset:
                value = slots[:, i - offset]
            else:
                value = jnp.take_along_axis(tokens, jnp.maximum(src, 0)[:, None], 1)[:, 0]
            fresh = jnp.where(src >= 0, value, rand[:, i])
            fresh_q = jnp.where((src >= 0)[:, None], jax.nn.one_hot(value, self.vocab),
                                q_rand[:, i])
            slots = slots.at[:, i].set(jnp.where(keep[:, i], slots[:, i], fresh))
            qs = qs.at[:, i].set(jnp.where(keep[:, i, None], qs[:, i], fresh_q))
        return slots, qs

    def update(self, state, *, tokens, n, accepted, probs, key, **_):
        """probs [B, K+1, V]: this window's rows; accepted [B]: drafts accepted (m)."""
        K = self.draft_len
        k_sample, k_fill = jax.random.split(key)
        samples = jax.random.categorical(k_sample, jnp.log(probs)).astype(jnp.int32)
        idx = accepted[:, None] + 1 + jnp.arange(K)  # rows predicting the next window's slots
        keep = idx <= K
        idx = jnp.minimum(idx, K)
        slots = jnp.take_along_axis(samples, idx, 1)
        qs = jnp.take_along_axis(probs, idx[..., None], 1)
        return self.fill(tokens, n, slots, qs, keep, k_fill)
