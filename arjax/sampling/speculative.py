"""Lossless speculative sampling for raster AR models with a small draft model.

Each round, per row: the draft proposes K tokens (K+1 cached steps, the last only to keep the
draft's cache complete), the target scores all K+1 positions in one cached call, token i is
accepted with probability min(1, p_i(d_i) / q_i(d_i)), and at the first rejection (or after K
acceptances) one token is drawn from norm(max(p - q, 0)) -- with q := 0 after the last draft, the
same formula gives the bonus token from p. The output distribution is exactly the target's
(Leviathan et al. 2023; Chen et al. 2023).

Every row advances by its own accepted length: positions are per row (int [B]) in both KV
caches, so a rejection is a rollback of a counter; stale cache entries are masked and later
overwritten. CFG doubles the batch to [cond; null] for both models; the same drafts are verified
for both halves, and p and q are the guided, filtered (temperature/top-k/top-p) distributions.
One `lax.while_loop`; static shapes; buffers sized L + K + 1.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from arjax.config import check
from arjax.models import bind
from arjax.sampling.common import SampleConfig, filter_logits, guided_logits


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    draft_len: int = 4  # K
    sample: SampleConfig = SampleConfig()

    def validate(self, vocab_size: int) -> None:
        check(self.draft_len >= 1, f"draft_len must be >= 1, got {self.draft_len}")
        self.sample.validate(vocab_size)


class SpeculativeStats(NamedTuple):
    forward_passes: jax.Array  # int32: target calls (verification rounds)
    draft_passes: jax.Array  # int32: draft model calls
    accepted: jax.Array  # int32 [B]: draft tokens accepted per row
    rounds: jax.Array  # int32 [B]: rounds in which the row was still generating


def token_probs(logits: jax.Array, cfg: SampleConfig) -> jax.Array:
    """The distribution a plain sampler draws from: [..., V] logits -> probabilities."""
    if cfg.temperature == 0:
        return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1])
    return jax.nn.softmax(filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p), -1)


def _sample(key, probs):
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def _take(x, idx):
    """x [B, N, ...], idx int [B] -> x[b, idx[b]]."""
    return jnp.take_along_axis(x, idx.reshape(-1, 1, *([1] * (x.ndim - 2))), axis=1)[:, 0]


def sample(target_graphdef, target_params, draft_graphdef, draft_params, key: jax.Array,
           labels: jax.Array, cfg: SpeculativeConfig) -> tuple[jax.Array, SpeculativeStats]:
    """Samples int32 tokens [B, L] distributed exactly as the target's plain sampler."""
    target, draft = bind(target_graphdef, target_params), bind(draft_graphdef, draft_params)
    length, vocab, k = target.cfg.seq_len, target.cfg.vocab_size, cfg.draft_len
    check(draft.cfg.vocab_size == vocab and draft.cfg.seq_len == length,
          "draft and target must share vocab_size and grid")
    cfg.validate(vocab)
    scfg, batch = cfg.sample, labels.shape[0]
    labels = labels.astype(jnp.int32)
    if scfg.uses_cfg:
        t_labels = jnp.concatenate([labels, jnp.full_like(labels, target.cfg.num_classes)])
        d_labels = jnp.concatenate([labels, jnp.full_like(labels, draft.cfg.num_classes)])
    else:
        t_labels = d_labels = labels
    rows = t_labels.shape[0]
    double = lambda x: jnp.concatenate([x] * (rows // batch), axis=0)
    width = length + k + 1  # room for a full window at the last position

    def guided_probs(logits, pos):
        """[rows, V] logits at per-row positions `pos` [B] -> the distribution [B, V] that
        the plain sampler would draw from (CFG combined at each row's own position)."""
        return token_probs(guided_logits(logits, scfg, pos, length), scfg)

    def round_(state):
        tokens, n, t_cache, d_cache, r, accepted, rounds = state
        key_r = jax.random.fold_in(key, r)
        prev0 = _take(tokens, jnp.maximum(n - 1, 0))

        def draft_step(i, carry):
            d_cache, prev, drafts, qs = carry
            pos = n + i
            x = draft.embed(double(prev[:, None]), d_labels, double(pos))
            logits, d_cache = draft.decode(x, d_cache, double(pos))
            q = guided_probs(logits[:, 0], pos)
            tok = _sample(jax.random.fold_in(jax.random.fold_in(key_r, 1), i), q)
            drafts = jax.lax.dynamic_update_slice_in_dim(drafts, tok[:, None], i, axis=1)
            qs = jax.lax.dynamic_update_slice_in_dim(qs, q[:, None], i, axis=1)
            return d_cache, tok, drafts, qs

        drafts = jnp.zeros((batch, k + 1), jnp.int32)
        qs = jnp.zeros((batch, k + 1, vocab), jnp.float32)
        d_cache, _, drafts, qs = jax.lax.fori_loop(0, k + 1, draft_step,
                                                   (d_cache, prev0, drafts, qs))
        qs = qs.at[:, k].set(0.0)  # no draft after the K-th: the residual is then p itself

        inputs = jnp.concatenate([prev0[:, None], drafts[:, :k]], axis=1)  # [B, K+1]
        x = target.embed(double(inputs), t_labels, double(n))
        logits, t_cache = target.decode(x, t_cache, double(n))
        window = n[:, None] + jnp.arange(k + 1)
        ps = jax.vmap(guided_probs, in_axes=(1, 1), out_axes=1)(logits, window)

        p_d = jnp.take_along_axis(ps[:, :k], drafts[:, :k, None], -1)[..., 0]
        q_d = jnp.take_along_axis(qs[:, :k], drafts[:, :k, None], -1)[..., 0]
        u = jax.random.uniform(jax.random.fold_in(key_r, 2), (batch, k))
        ok = u * q_d < p_d  # u < p/q without dividing
        m = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)  # leading acceptances, 0..K
        residual = jnp.maximum(_take(ps, m) - _take(qs, m), 0.0)
        residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, _take(ps, m))
        fix = _sample(jax.random.fold_in(key_r, 3), residual)
        new = jnp.where(jnp.arange(k + 1) < m[:, None], drafts,
                        jnp.where(jnp.arange(k + 1) == m[:, None], fix[:, None], 0))
        active = n < length
        tokens = jax.vmap(lambda row, w, p: jax.lax.dynamic_update_slice(row, w, (p,)))(
            tokens, new, jnp.where(active, n, length))  # finished rows write into padding
        n = jnp.where(active, n + m + 1, n)
        return (tokens, n, t_cache, d_cache, r + 1, accepted + jnp.where(active, m, 0),
                rounds + active)

    zeros = jnp.zeros((batch,), jnp.int32)
    init = (jnp.zeros((batch, width), jnp.int32), zeros, target.init_cache(rows, width),
            draft.init_cache(rows, width), jnp.zeros((), jnp.int32), zeros, zeros)
    tokens, _, _, _, r, accepted, rounds = jax.lax.while_loop(
        lambda s: jnp.any(s[1] < length), round_, init)
    return tokens[:, :length], SpeculativeStats(forward_passes=r, draft_passes=r * (k + 1),
                                                accepted=accepted, rounds=rounds)
