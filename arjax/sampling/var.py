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

CoDe (`sample_collaborative`, arXiv 2411.17787) splits the scales between a large drafter
(scales 0..N-1) and a small refiner that prefills its own cache with one block-causal pass
over the drafter's next-scale inputs, then finishes; per-scale top-k and temperature (with
CoDe's temperature-after-filter order as an option) apply to both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from arjax.config import check
from arjax.distill.flow import FlowDraw
from arjax.models import bind
from arjax.nn.scales import scale_bounds
from arjax.sampling.common import (
    cfg_combine,
    cfg_weight,
    check_guidance,
    doubled_rows,
    filter_logits,
)
from arjax.sampling.generator import Samples


@dataclasses.dataclass(frozen=True)
class VARSampleConfig:
    cfg: float = 2.5  # guidance weight at the last scale (official cfg=1.5); 1 = off
    cfg_schedule: str = "linear"  # the official ramp from 1 at the first scale
    top_k: int = 900  # 0 = off
    top_p: float = 0.96  # 1 = off
    smooth: bool = False  # Gumbel-softmax code mixture (more_smooth; not for FID)
    top_k_per_scale: tuple[int, ...] = ()  # one top-k per scale instead of `top_k`
    temperature: tuple[float, ...] = ()  # one per scale; () = 1 (CoDe: [1.1] * 7 + [1.0] * 3)
    temperature_after_filter: bool = False  # CoDe's order: top-k/top-p first, then divide

    def validate(self, vocab_size: int, scales: int | None = None) -> None:
        check_guidance(self.cfg, self.cfg_schedule)
        for k in (self.top_k, *self.top_k_per_scale):
            check(0 <= k <= vocab_size,
                  f"sample.top_k={k} must be in [0, vocab_size={vocab_size}] (0 = off)")
        check(0 < self.top_p <= 1, f"sample.top_p must be in (0, 1], got {self.top_p}")
        check(all(t > 0 for t in self.temperature),
              f"sample.temperature values must be > 0, got {self.temperature}")
        for name in ("top_k_per_scale", "temperature"):
            n = len(getattr(self, name))
            check(scales is None or n in (0, scales),
                  f"sample.{name} has {n} values; give one per scale ({scales}) or none")

    def processed(self, logits: jax.Array, k: int, scales: int, batch: int) -> jax.Array:
        """Scale k's logits over the doubled batch [cond; null] (just [B] without guidance)
        -> the logits its tokens are drawn from: the guided combination, then `filter`."""
        if self.cfg != 1:
            w = cfg_weight(self.cfg, self.cfg_schedule, k, scales)
            logits = cfg_combine(logits[:batch], logits[batch:], w)
        return self.filter(logits, k)

    def filter(self, logits: jax.Array, k: int) -> jax.Array:
        """Scale k's guided logits -> the logits it samples from: temperature (before or,
        CoDe's order, after the filter), then top-k / top-p."""
        top_k = self.top_k_per_scale[k] if self.top_k_per_scale else self.top_k
        t = self.temperature[k] if self.temperature else 1.0
        if self.temperature_after_filter:
            return filter_logits(logits, top_k, self.top_p) / t
        return filter_logits(logits / t, top_k, self.top_p)


class _Stream(NamedTuple):
    """One VAR's decoding state over the doubled batch [cond; null]."""
    model: object
    cond: jax.Array
    block_cond: jax.Array
    cache: list


def _start(model, labels: jax.Array, guided: bool) -> _Stream:
    rows = labels.astype(jnp.int32)
    if guided:
        rows = jnp.concatenate([rows, jnp.full_like(rows, model.cfg.num_classes)])
    cond, block_cond = model.conditioning(rows)
    return _Stream(model, cond, block_cond, model.init_cache(rows.shape[0]))


def _draw(logits, k: int, key, cfg: VARSampleConfig, batch: int, scales: int, codebook,
          noise=None, flow: FlowDraw | None = None):
    """Scale k's logits over the doubled batch -> (codes int32 [B, n], code vectors h); with
    `flow`, DD1's flow of the scale's `noise` [B, n, C] instead of the categorical draw."""
    logits = cfg.processed(logits, k, scales, batch)
    if flow is not None:
        codes = flow.draw(logits, noise)[0]
        return codes, codebook[codes]
    k_idx, k_gumbel = jax.random.split(jax.random.fold_in(key, k))
    codes = jax.random.categorical(k_idx, logits).astype(jnp.int32)
    if not cfg.smooth:
        return codes, codebook[codes]
    ratio = k / (scales - 1)
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    gumbel = jax.random.gumbel(k_gumbel, logits.shape)
    return codes, jax.nn.softmax((logits * (1 + ratio) + gumbel) / tau, axis=-1) @ codebook


def _check_pair(model, vae) -> None:
    check(vae.cfg.patch_nums == model.cfg.patch_nums
          and vae.cfg.codebook_size == model.cfg.vocab_size,
          "VAR and its tokenizer must share patch_nums and codebook_size")


def sample(graphdef, params, vae_graphdef, vae_params, key: jax.Array, labels: jax.Array,
           cfg: VARSampleConfig, flow: FlowDraw | None = None,
           prefix: list[jax.Array] | None = None, stop: int | None = None) -> Samples:
    """labels int [B] -> Samples(images [B, H, W, 3] in [-1, 1], {"codes": flat codes
    [B, sum pn^2]}, {"target_passes"}). With `flow` the codes are DD1's flow map
    (`arjax.distill.flow`): each position's code is the flow of its own noise vector
    (`flow.noise` [B, L, C] in code order) under the scale's processed distribution.
    `prefix` (the codes [B, pn^2] of scales 0..s-1) fixes those scales (one prefill pass of
    their inputs, counted) and sampling stops before scale `stop` (later codes 0, the image
    only from the scales made): DD's teacher-involved sampling re-samples such a span."""
    model = bind(graphdef, params)
    check(flow is None or not cfg.smooth, "the flow map draws hard codes: sample.smooth=False")
    scales = len(model.cfg.patch_nums)
    start, stop = len(prefix or ()), scales if stop is None else stop
    check(0 <= start < stop <= scales,
          f"a prefix of {start} scales and stop={stop} must satisfy 0 <= prefix < stop <= "
          f"{scales}")
    return _decode([(model, stop - start)], bind(vae_graphdef, vae_params), key, labels, cfg,
                   flow, prefix or [])


def sample_collaborative(drafter, refiner, vae_graphdef, vae_params, key: jax.Array,
                         labels: jax.Array, cfg: VARSampleConfig, draft_steps: int) -> Samples:
    """CoDe: the `drafter` VAR (graphdef, params) samples scales 0..N-1 (N = draft_steps),
    then the `refiner` VAR fills its cache with one block-causal pass over the inputs of
    scales 0..N and samples scales N..K-1; one VQ-VAE decodes. Scale k draws with the key
    fold_in(key, k) either way, so drafter == refiner gives plain `sample`'s codes. Stats:
    `drafter_passes`, `refiner_passes` and their sum `target_passes`."""
    d_model, r_model = bind(*drafter), bind(*refiner)
    scales = len(d_model.cfg.patch_nums)
    check(r_model.cfg.patch_nums == d_model.cfg.patch_nums
          and r_model.cfg.vocab_size == d_model.cfg.vocab_size
          and r_model.cfg.codebook_dim == d_model.cfg.codebook_dim,
          "CoDe's drafter and refiner must share patch_nums, vocab_size and codebook_dim "
          "(one tokenizer)")
    check(1 <= draft_steps <= scales - 1,
          f"draft_steps={draft_steps} must be in [1, {scales - 1}] (scales drafted by the "
          "large model; the refiner does the rest)")
    return _decode([(d_model, draft_steps), (r_model, scales - draft_steps)],
                   bind(vae_graphdef, vae_params), key, labels, cfg)


def _decode(models, vae, key, labels, cfg: VARSampleConfig, flow=None, prefix=()) -> Samples:
    """Scales after the given `prefix` codes by consecutive models [(model, number of
    scales)]: each model after the first scale prefills its cache with the next-scale inputs of
    every earlier scale in one pass."""
    first = models[0][0]
    for model, _ in models:
        _check_pair(model, vae)
    mcfg = first.cfg
    scales, side = len(mcfg.patch_nums), mcfg.patch_nums[-1]
    cfg.validate(mcfg.vocab_size, scales)
    batch, guided = labels.shape[0], cfg.cfg != 1
    f_hat = jnp.zeros((batch, side, side, mcfg.codebook_dim))
    codes, inputs, stats, start = [], [], {}, 0
    table = vae.quantize.embedding.embedding[...]
    for k, given in enumerate(prefix):
        f_hat, nxt = vae.quantize.next_input(k, f_hat, table[given], side)
        codes, inputs, start = codes + [given.astype(jnp.int32)], inputs + [nxt], k + 1
    for i, (model, count) in enumerate(models):
        s = _start(model, labels, guided)
        x = model.embed(s.cond, None, 0)
        if inputs:  # the next-scale inputs of scales 1..start: one prefill pass
            x = jnp.concatenate(
                [x, model.embed(None, _doubled(jnp.concatenate(inputs, 1), guided), 1)], axis=1)
        calls = 0
        for k in range(start, start + count):
            cache, scale_codes, f_hat, nxt, x = _scale(model, vae, s, x, f_hat, k,
                                                        key, cfg, k > start, flow)
            s, calls = s._replace(cache=cache), calls + 1
            codes.append(scale_codes)
            if nxt is not None:
                inputs.append(nxt)
        start += count
        name = ("drafter_passes", "refiner_passes")[i] if len(models) > 1 else "target_passes"
        stats[name] = jnp.int32(calls)  # a prefill is one call
    if len(models) > 1:
        stats["target_passes"] = stats["drafter_passes"] + stats["refiner_passes"]
    flat = jnp.concatenate(codes, axis=1)
    flat = jnp.pad(flat, ((0, 0), (0, mcfg.seq_len - flat.shape[1])))  # scales not made: 0
    return Samples(vae.decode_f_hat(f_hat), {"codes": flat}, stats)


def _doubled(x: jax.Array, guided: bool) -> jax.Array:
    return jnp.concatenate([x, x]) if guided else x


def _scale(model, vae, s: _Stream, x, f_hat, k: int, key, cfg: VARSampleConfig,
           cached: bool = True, flow: FlowDraw | None = None):
    """Scale k: the transformer over input `x` (the scale's own tokens, or after a prefill
    every earlier scale's too: `cached` False starts at position 0), the draw, the residual
    update of f_hat and the next scale's input. -> (cache, codes, f_hat, next input before
    embedding or None after the last scale, embedded next input or None)."""
    mcfg = model.cfg
    scales, side = len(mcfg.patch_nums), mcfg.patch_nums[-1]
    begin, end = scale_bounds(mcfg.patch_nums)[k]
    logits, cache = model.decode_scale(x, s.cond, s.block_cond, s.cache, begin if cached else 0)
    codes, h = _draw(logits[:, begin - end:], k, key, cfg, f_hat.shape[0], scales,
                     vae.quantize.embedding.embedding[...],
                     None if flow is None else flow.noise[:, begin:end], flow)
    f_hat, nxt = vae.quantize.next_input(k, f_hat, h, side)
    x = None if nxt is None else model.embed(None, _doubled(nxt, cfg.cfg != 1), end)
    return cache, codes, f_hat, nxt, x


@functools.partial(jax.jit, static_argnames=("graphdef", "vae_graphdef", "k", "cfg", "decode"))
def _scale_step(graphdef, params, vae_graphdef, vae_params, state: dict, labels, key, k: int,
                cfg: VARSampleConfig, decode: bool):
    """Scale k for the candidates `labels`: -> (state with this scale's codes, the decoded
    images when `decode`, else None, tokens through the transformer)."""
    model, vae = bind(graphdef, params), bind(vae_graphdef, vae_params)
    begin, end = scale_bounds(model.cfg.patch_nums)[k]
    s = _start(model, labels, cfg.cfg != 1)._replace(cache=state["cache"])
    cache, codes, f_hat, _, x = _scale(model, vae, s, state["x"], state["f_hat"], k, key, cfg)
    new = {"cache": cache, "f_hat": f_hat, "x": state["x"] if x is None else x,
           "codes": state["codes"].at[:, begin:end].set(codes)}
    images = vae.decode_f_hat(f_hat) if decode else None
    return new, images, {"token_passes": jnp.int32(state["x"].shape[0] * state["x"].shape[1])}


@dataclasses.dataclass(frozen=True)
class Candidates:
    """VAR decoded one scale at a time for a batch of candidates (`sampling.search`): the
    state is the KV caches of both CFG halves, f_hat, the next input and the codes so far."""
    graphdef: object
    params: object
    vae_graphdef: object
    vae_params: object
    cfg: VARSampleConfig

    def __post_init__(self):
        _check_pair(self.model, bind(self.vae_graphdef, self.vae_params))
        self.cfg.validate(self.model.cfg.vocab_size, self.scales)

    @functools.cached_property
    def model(self):
        return bind(self.graphdef, self.params)

    @property
    def scales(self) -> int:
        return len(self.model.cfg.patch_nums)

    def start(self, labels: jax.Array) -> dict:
        model, mcfg = self.model, self.model.cfg
        side = mcfg.patch_nums[-1]
        s = _start(model, labels, self.cfg.cfg != 1)
        return {"cache": s.cache, "x": model.embed(s.cond, None, 0),
                "f_hat": jnp.zeros((labels.shape[0], side, side, mcfg.codebook_dim)),
                "codes": jnp.zeros((labels.shape[0], mcfg.seq_len), jnp.int32)}

    def step(self, state: dict, labels: jax.Array, key: jax.Array, k: int, decode: bool):
        """-> (state, images in [-1, 1] or None, counted cost of the step)."""
        return _scale_step(self.graphdef, self.params, self.vae_graphdef, self.vae_params,
                           state, labels, key, k, self.cfg, decode)

    def gather(self, state: dict, rows: jax.Array) -> dict:
        """Keeps candidates `rows`: the batch axis of f_hat and codes, rows (i, B + i) of the
        doubled CFG batch of the caches and the input."""
        doubled = doubled_rows(rows, state["f_hat"].shape[0], self.cfg.cfg != 1)
        return {"cache": jax.tree.map(lambda a: a[doubled], state["cache"]),
                "x": state["x"][doubled], "f_hat": state["f_hat"][rows],
                "codes": state["codes"][rows]}

    def outputs(self, state: dict) -> dict:
        return {"codes": state["codes"]}

