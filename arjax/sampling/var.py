"""VAR next-scale sampling: one cached transformer call per scale, CFG ramp, top-k / top-p.

Follows `autoregressive_infer_cfg`: the batch is doubled to [cond; null]; at scale k of K the
logits are null + w_k (cond - null) with w_k = 1 + (cfg - 1) k / (K - 1) (`cfg_schedule`
"linear", the official ramp: no guidance at the first scale; the official `cfg=1.5` is
`cfg=2.5` in arjax's weight convention, `sampling.common`);
top-k keeps ties with the k-th logit and top-p keeps the nucleus (`filter_logits`); the sampled
codes update f_hat through the tokenizer's Phi, and f_hat area-downsampled to the next side is
the next input. With `smooth` (the official `more_smooth`, for visualisation) f_hat takes a
Gumbel-softmax mixture of code vectors instead of the hard codes. The scale loop is unrolled
(10 static shapes), so the whole sampler, decoder included, is one jitted function.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from arjax.config import check
from arjax.models import bind
from arjax.nn.scales import scale_bounds
from arjax.sampling.common import cfg_combine, cfg_weight, check_guidance, filter_logits
from arjax.sampling.generator import Samples


@dataclasses.dataclass(frozen=True)
class VARSampleConfig:
    cfg: float = 2.5  # guidance weight at the last scale (official cfg=1.5); 1 = off
    cfg_schedule: str = "linear"  # the official ramp from 1 at the first scale
    top_k: int = 900  # 0 = off
    top_p: float = 0.96  # 1 = off
    smooth: bool = False  # Gumbel-softmax code mixture (more_smooth; not for FID)

    def validate(self, vocab_size: int) -> None:
        check_guidance(self.cfg, self.cfg_schedule)
        check(0 <= self.top_k <= vocab_size,
              f"sample.top_k={self.top_k} must be in [0, vocab_size={vocab_size}] (0 = off)")
        check(0 < self.top_p <= 1, f"sample.top_p must be in (0, 1], got {self.top_p}")


def sample(graphdef, params, vae_graphdef, vae_params, key: jax.Array, labels: jax.Array,
           cfg: VARSampleConfig) -> Samples:
    """labels int [B] -> Samples(images [B, H, W, 3] in [-1, 1], {"codes": flat codes
    [B, sum pn^2]}, {"target_passes"})."""
    model, vae = bind(graphdef, params), bind(vae_graphdef, vae_params)
    mcfg = model.cfg
    cfg.validate(mcfg.vocab_size)
    check(vae.cfg.patch_nums == mcfg.patch_nums and vae.cfg.codebook_size == mcfg.vocab_size,
          "VAR and its tokenizer must share patch_nums and codebook_size")
    batch, scales, side = labels.shape[0], len(mcfg.patch_nums), mcfg.patch_nums[-1]
    guided = cfg.cfg != 1
    rows = labels.astype(jnp.int32)
    if guided:
        rows = jnp.concatenate([rows, jnp.full_like(rows, mcfg.num_classes)])
    double = (lambda x: jnp.concatenate([x, x])) if guided else (lambda x: x)
    cond, block_cond = model.conditioning(rows)
    cache = model.init_cache(rows.shape[0])
    f_hat = jnp.zeros((batch, side, side, mcfg.codebook_dim))
    codebook = vae.quantize.embedding.embedding[...]
    x, codes, passes = model.embed(cond, None, 0), [], jnp.zeros((), jnp.int32)
    for k, (begin, end) in enumerate(scale_bounds(mcfg.patch_nums)):
        logits, cache = model.decode_scale(x, cond, block_cond, cache, begin)
        passes += 1
        if guided:
            w = cfg_weight(cfg.cfg, cfg.cfg_schedule, k, scales)
            logits = cfg_combine(logits[:batch], logits[batch:], w)
        logits = filter_logits(logits, cfg.top_k, cfg.top_p)
        k_idx, k_gumbel = jax.random.split(jax.random.fold_in(key, k))
        codes.append(jax.random.categorical(k_idx, logits).astype(jnp.int32))
        if cfg.smooth:
            ratio = k / (scales - 1)
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            gumbel = jax.random.gumbel(k_gumbel, logits.shape)
            h = jax.nn.softmax((logits * (1 + ratio) + gumbel) / tau, axis=-1) @ codebook
        else:
            h = codebook[codes[-1]]
        f_hat, nxt = vae.quantize.next_input(k, f_hat, h, side)
        if nxt is not None:
            x = model.embed(None, double(nxt), end)
    return Samples(vae.decode_f_hat(f_hat), {"codes": jnp.concatenate(codes, axis=1)},
                   {"target_passes": passes})
