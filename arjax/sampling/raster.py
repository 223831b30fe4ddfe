"""KV-cache sampler for raster-order AR models: one jit-compiled `lax.fori_loop`.

Static shapes throughout: the cache is preallocated for all L positions, CFG doubles the batch
to [cond; null] so both halves share one cache, and the per-step key is fold_in(key, step).
No host round-trip per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from arjax.models import bind
from arjax.sampling.common import SampleConfig, SampleStats, guided_logits, sample_token
from arjax.sampling.generator import Samples


def sample(graphdef, params, key: jax.Array, labels: jax.Array, cfg: SampleConfig
           ) -> tuple[jax.Array, SampleStats]:
    """Samples int32 tokens [B, L] for class `labels` [B]. Jit with `static_argnames="cfg"`."""
    model = bind(graphdef, params)
    mcfg = model.cfg
    cfg.validate(mcfg.vocab_size)
    length, batch = mcfg.seq_len, labels.shape[0]
    labels = labels.astype(jnp.int32)
    if cfg.uses_cfg:
        labels = jnp.concatenate([labels, jnp.full_like(labels, mcfg.num_classes)])
    rows = labels.shape[0]

    def step(t, carry):
        tokens, cache, logprob, passes = carry
        prev = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(t - 1, 0), 1, axis=1)
        prev = jnp.concatenate([prev] * (rows // batch), axis=0)
        logits, cache = model.decode(model.embed(prev, labels, t), cache, t)
        logits = guided_logits(logits[:, 0], cfg, t, length)
        token, logp = sample_token(jax.random.fold_in(key, t), logits, cfg)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], t, axis=1)
        return tokens, cache, logprob + logp, passes + 1

    init = (jnp.zeros((batch, length), jnp.int32), model.init_cache(rows),
            jnp.zeros((batch,), jnp.float32), jnp.zeros((), jnp.int32))
    tokens, _, logprob, passes = jax.lax.fori_loop(0, length, step, init)
    return tokens, SampleStats(target_passes=passes, logprob=logprob)


def sample_images(graphdef, params, vq_graphdef, vq_params, key: jax.Array, labels: jax.Array,
                  cfg: SampleConfig) -> Samples:
    """The sampler contract: tokens and the VQ decoder in one function (jit it whole)."""
    tokens, stats = sample(graphdef, params, key, labels, cfg)
    images = bind(vq_graphdef, vq_params).decode(tokens)
    return Samples(images, {"tokens": tokens}, {"target_passes": stats.target_passes})
