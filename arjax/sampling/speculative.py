"""Speculative and parallel decoding for raster AR models: one core, pluggable drafts and rules.

Each round, every row proposes K drafts (or k chains of K), the target scores the window
[last committed token, drafts] in one cached call, the verifier keeps the longest accepted
prefix and draws one correction token (or a bonus token when all K are accepted), and the
drafter refreshes. The methods of the literature are combinations:

    method   drafter   accept    num_drafts   lossless
    SD       model     exact     1            yes   (Leviathan et al.; Chen et al. 2023)
    SpecTr   model     exact     k > 1        yes   (K-SEQ over k i.i.d. chains; Sun et al.)
    SJD      jacobi    exact     1            yes   (Teng et al. 2025)
    GSD      jacobi    group     1            no    (So et al. 2025)
    LANTERN  model     relaxed   1            no, TV <= delta per step (Jang et al. 2025)

Static shapes throughout: a fixed window, per-row positions in the KV caches (a rejection
only lowers the row's length; stale entries are masked, then overwritten), `lax.while_loop`s
over the caches in `sample.segments` runs as the raster sampler's (a run ends when the leading
row's window would pass its cache; the attention reads about the filled part), no host
round-trips. Rows advance by their own accepted lengths (no batch
minimum, which makes the official SJD inexact for batch > 1). CFG doubles the batch to
[cond; null]; both halves score the same drafts and p, q are the guided, filtered
(temperature/top-k/top-p) distributions the plain sampler draws from.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from arjax.config import check
from arjax.models import bind
from arjax.nn.attention import extend_cache
from arjax.sampling import multidraft
from arjax.sampling.acceptance import Exact, Grouped, Relaxed, nearest_codes
from arjax.sampling.common import SampleConfig, filter_logits, guided_logits, step_runs
from arjax.sampling.drafters import JACOBI_INITS, JacobiDrafter, ModelDrafter, select_chain
from arjax.sampling.generator import Samples

DRAFTERS = ("model", "jacobi")
RULES = ("exact", "group", "relaxed")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    drafter: str = "model"  # "model": a small draft GPT; "jacobi": the target's own samples
    accept: str = "exact"  # "exact" (lossless), "group" (GSD), "relaxed" (LANTERN)
    draft_len: int = 4  # K drafts per window (the target scores K + 1 positions)
    num_drafts: int = 1  # k > 1: SpecTr, k i.i.d. draft chains verified by K-SEQ
    init: str = "uniform"  # jacobi: fresh slots (see JacobiDrafter)
    group_window: int = 6  # group: rank neighbours on each side of the draft
    group_p: float = 0.15  # group: max |p(y) - p(x)| inside a group
    group_dist: float = 0.5  # group: max squared code distance inside a group
    delta: float = 0.1  # relaxed: total-variation budget per step
    neighbours: int = 1000  # relaxed: latent neighbours considered per code

    def validate(self) -> None:
        check(self.drafter in DRAFTERS, f"drafter must be one of {DRAFTERS}, got {self.drafter!r}")
        check(self.accept in RULES, f"accept must be one of {RULES}, got {self.accept!r}")
        check(self.draft_len >= 1, f"draft_len must be >= 1, got {self.draft_len}")
        check(self.num_drafts >= 1, f"num_drafts must be >= 1, got {self.num_drafts}")
        check(self.num_drafts == 1 or (self.drafter == "model" and self.accept == "exact"),
              "num_drafts > 1 (SpecTr) needs drafter='model' and accept='exact'")
        check(self.init in JACOBI_INITS, f"init must be one of {JACOBI_INITS}, got {self.init!r}")
        check(self.group_window >= 0, f"group_window must be >= 0, got {self.group_window}")
        check(0 <= self.delta <= 1, f"delta must be in [0, 1], got {self.delta}")
        check(self.neighbours >= 1, f"neighbours must be >= 1, got {self.neighbours}")

    @property
    def method(self) -> str:
        """The literature's name for this combination (for logs and plots)."""
        if self.num_drafts > 1:
            return "spectr"
        return {("model", "exact"): "sd", ("jacobi", "exact"): "sjd",
                ("jacobi", "group"): "gsd", ("model", "relaxed"): "lantern"}.get(
            (self.drafter, self.accept), f"{self.drafter}+{self.accept}")


class SpeculativeStats(NamedTuple):
    target_passes: jax.Array  # int32: target calls (verification rounds)
    draft_passes: jax.Array  # int32: draft model calls (0 for jacobi), counted per call
    accepted: jax.Array  # int32 [B]: drafts accepted per row
    rounds: jax.Array  # int32 [B]: rounds in which the row was still generating
    first_accepted: jax.Array  # int32 [B]: rounds whose first draft was accepted


def token_probs(logits: jax.Array, cfg: SampleConfig) -> jax.Array:
    """The distribution a plain sampler draws from: [..., V] logits -> probabilities."""
    if cfg.temperature == 0:
        return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1])
    return jax.nn.softmax(filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p), -1)


def _categorical(key, probs):
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def _take(x, idx):
    """x [B, N, ...], idx int [B] -> x[b, idx[b]]."""
    return jnp.take_along_axis(x, idx.reshape(-1, 1, *([1] * (x.ndim - 2))), axis=1)[:, 0]


def _nonempty(residual, fallback):
    """A residual of zero mass (p == q, measure zero) falls back to p."""
    return jnp.where(residual.sum(-1, keepdims=True) > 0, residual, fallback)


def make_rule(cfg: SpeculativeConfig, codes: jax.Array | None,
              neighbours: jax.Array | None = None):
    if cfg.accept == "group":
        return Grouped(cfg.group_window, cfg.group_p, cfg.group_dist, codes)
    if cfg.accept == "relaxed":
        return Relaxed(nearest_codes(codes, cfg.neighbours) if neighbours is None
                       else neighbours, cfg.delta)
    return Exact()


def verify_chain(rule, ps, qs, drafts, key):
    """One chain: ps [B, K+1, V], qs [B, K, V], drafts [B, K] -> (accepted m [B], token [B])."""
    batch, K = drafts.shape
    a = rule.accept(ps[:, :K], qs, drafts)
    k_u, k_y = jax.random.split(key)
    ok = jax.random.uniform(k_u, (batch, K)) < a
    m = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
    j = jnp.minimum(m, K - 1)
    p_m = _take(ps, m)
    residual = jnp.where((m < K)[:, None], rule.residual(p_m, _take(qs, j), _take(drafts, j)),
                         p_m)  # after K acceptances: the bonus token from p
    return m, _categorical(k_y, _nonempty(residual, p_m))


def verify_chains(ps, qs, drafts, key):
    """SpecTr: k chains, ps [B, k, K+1, V], qs [B, k, K, V], drafts [B, k, K] ->
    (accepted m [B], token [B], chain [B]). At each depth K-SEQ selects among the chains
    still sharing the accepted prefix (i.i.d. given it); its residual ends the round."""
    batch, k, K = drafts.shape

    def depth(carry, t):
        alive, surv, m, y = carry
        lead = jnp.argmax(surv, axis=1)  # survivors share the prefix, hence p and q rows
        p = _take(ps[:, :, t], lead)
        q = _take(qs[:, :, t], lead)
        count = jnp.sum(surv, axis=1).astype(jnp.float32)
        rho = multidraft.optimal_rho(p, q, count)
        k_u, k_y = jax.random.split(jax.random.fold_in(key, t))
        a = multidraft.kseq_accept_probs(p, q, drafts[:, :, t], rho)
        ok = surv & (jax.random.uniform(k_u, (batch, k)) < a)
        hit = jnp.any(ok, axis=1)
        x = _take(drafts[:, :, t], jnp.argmax(ok, axis=1))
        residual = _nonempty(multidraft.kseq_residual(p, q, count, rho), p)
        y = jnp.where(alive & ~hit, _categorical(k_y, residual), y)
        m = jnp.where(alive & hit, t + 1, m)
        surv = jnp.where((alive & hit)[:, None], surv & (drafts[:, :, t] == x[:, None]), surv)
        return (alive & hit, surv, m, y), None

    zeros = jnp.zeros((batch,), jnp.int32)
    (alive, surv, m, y), _ = jax.lax.scan(
        depth, (jnp.ones((batch,), bool), jnp.ones((batch, k), bool), zeros, zeros),
        jnp.arange(K))
    chain = jnp.argmax(surv, axis=1).astype(jnp.int32)
    bonus = _categorical(jax.random.fold_in(key, K), _take(ps[:, :, K], chain))
    return m, jnp.where(alive, bonus, y), chain


def _another_round(state, length: int, last: int) -> jax.Array:
    """Some row is unfinished and every unfinished row's window fits the run's cache (its
    committed length n <= last)."""
    unfinished = state[1] < length
    return jnp.any(unfinished) & jnp.all(~unfinished | (state[1] <= last))


def sample(graphdef, params, key: jax.Array, labels: jax.Array, scfg: SampleConfig,
           cfg: SpeculativeConfig, draft=None, codes: jax.Array | None = None,
           neighbours: jax.Array | None = None) -> tuple[jax.Array, SpeculativeStats]:
    """Samples int32 tokens [B, L]; for lossless methods exactly the distribution of
    `raster.sample(graphdef, params, key, labels, scfg)`. `draft` = (graphdef, params) of the
    draft GPT (drafter="model"); `codes` [V, D] are the tokenizer's code vectors (optional for
    accept="group"); accept="relaxed" needs `neighbours` = `nearest_codes(codes,
    cfg.neighbours)` (pass it precomputed: an O(V^2) table is otherwise rebuilt at every call)
    or `codes`."""
    target = bind(graphdef, params)
    length, vocab, grid = target.cfg.seq_len, target.cfg.vocab_size, target.cfg.grid
    scfg.validate(vocab)
    cfg.validate()
    check(cfg.drafter != "model" or draft is not None, "drafter='model' needs a draft model")
    check(cfg.accept != "relaxed" or codes is not None or neighbours is not None,
          "accept='relaxed' (LANTERN) needs the tokenizer's code vectors (codes=...) or "
          "their nearest_codes table (neighbours=...)")
    check(neighbours is None or neighbours.shape[0] == vocab,
          f"neighbours must have one row per token ({vocab})")
    check(codes is None or codes.shape[0] == vocab,
          f"codes must have one row per token ({vocab}), got {codes is not None and codes.shape}")
    batch, k, K = labels.shape[0], cfg.num_drafts, cfg.draft_len
    labels = jnp.repeat(labels.astype(jnp.int32), k)  # b-major chains
    with_null = lambda y, null: (jnp.concatenate([y, jnp.full_like(y, null)])
                                 if scfg.uses_cfg else y)
    t_labels = with_null(labels, target.cfg.num_classes)
    rows = t_labels.shape[0]
    double = lambda x: jnp.concatenate([x] * (rows // (batch * k)), axis=0)
    width = length + K + 1  # room for a full window at the last position

    def guide(logits, pos):
        """[rows, V] logits at per-chain positions [B*k] -> the plain sampler's [B*k, V]."""
        return token_probs(guided_logits(logits, scfg, pos, length), scfg)

    if cfg.drafter == "model":
        model = bind(*draft)
        check(model.cfg.vocab_size == vocab and model.cfg.seq_len == length,
              "draft and target must share vocab_size and grid")
        drafter = ModelDrafter(model, with_null(labels, model.cfg.num_classes), guide, K, k)
    else:
        drafter = JacobiDrafter(vocab, grid, K, cfg.init)
    rule = make_rule(cfg, codes, neighbours)

    key_init, key_loop = jax.random.split(key)

    def round_(state):
        tokens, n, t_cache, d_state, r, d_calls, accepted, rounds, first = state
        k_draft, k_verify, k_refresh = jax.random.split(jax.random.fold_in(key_loop, r), 3)
        prev = _take(tokens, jnp.maximum(n - 1, 0))  # at n == 0 the class embedding is used
        d_state, drafts, qs, calls = drafter.propose(d_state, prev, n, k_draft)
        pos = jnp.repeat(n, k)
        inputs = jnp.concatenate([jnp.repeat(prev, k)[:, None], drafts.reshape(-1, K)], 1)
        logits, t_cache = target.decode(target.embed(double(inputs), t_labels, double(pos)),
                                        t_cache, double(pos))
        window = pos[:, None] + jnp.arange(K + 1)
        ps = jax.vmap(guide, in_axes=(1, 1), out_axes=1)(logits, window)
        ps = ps.reshape(batch, k, K + 1, vocab)
        if k == 1:
            m, y = verify_chain(rule, ps[:, 0], qs[:, 0], drafts[:, 0], k_verify)
            chain = jnp.zeros((batch,), jnp.int32)
        else:
            m, y, chain = verify_chains(ps, qs, drafts, k_verify)
            t_cache = select_chain(t_cache, chain, batch, k)
        slots = jnp.arange(K + 1)
        new = jnp.where(slots < m[:, None], jnp.pad(_take(drafts, chain), ((0, 0), (0, 1))),
                        jnp.where(slots == m[:, None], y[:, None], 0))
        active = n < length
        tokens = jax.vmap(lambda row, w, p: jax.lax.dynamic_update_slice(row, w, (p,)))(
            tokens, new, jnp.where(active, n, length))  # finished rows write into padding
        n = jnp.where(active, n + m + 1, n)
        d_state = drafter.update(d_state, chain=chain, tokens=tokens, n=n, accepted=m,
                                 probs=_take(ps, chain), key=k_refresh)
        return (tokens, n, t_cache, d_state, r + 1, d_calls + calls,
                accepted + jnp.where(active, m, 0), rounds + active, first + (active & (m > 0)))

    # Cache runs: run j's rounds use caches of `room` = end_j + K + 1 positions, as long as
    # every unfinished row's window fits. The rounds, keys and states are those of one loop
    # over the whole cache; only the attention reads less.
    rooms = [end + K + 1 for _, end in step_runs(0, length, scfg.segments)]
    zeros = jnp.zeros((batch,), jnp.int32)
    scalar = jnp.zeros((), jnp.int32)
    state = (jnp.zeros((batch, width), jnp.int32), zeros, target.init_cache(rows, rooms[0]),
             drafter.init(batch, key_init, rooms[0]), scalar, scalar, zeros, zeros, zeros)
    for room in rooms:
        tokens, n, t_cache, d_state, *counts = state
        state = (tokens, n, [extend_cache(c, room) for c in t_cache],
                 drafter.extend(d_state, room), *counts)
        state = jax.lax.while_loop(
            functools.partial(_another_round, length=length, last=room - K - 1), round_, state)
    tokens, _, _, _, r, d_calls, accepted, rounds, first = state
    return tokens[:, :length], SpeculativeStats(
        target_passes=r, draft_passes=d_calls, accepted=accepted, rounds=rounds,
        first_accepted=first)


def summary_stats(stats: SpeculativeStats) -> dict[str, jax.Array]:
    """The scalar stats of the sampler contract (means over rows of the counted arrays)."""
    rounds = jnp.maximum(stats.rounds, 1)
    return {"target_passes": stats.target_passes, "draft_passes": stats.draft_passes,
            "mean_accepted_per_round": jnp.mean(stats.accepted / rounds),
            "first_draft_acceptance": jnp.mean(stats.first_accepted / rounds),
            "mean_rounds": jnp.mean(stats.rounds.astype(jnp.float32))}


def sample_images(graphdef, params, vq_graphdef, vq_params, key: jax.Array, labels: jax.Array,
                  scfg: SampleConfig, cfg: SpeculativeConfig, draft=None,
                  neighbours: jax.Array | None = None) -> Samples:
    """The sampler contract: speculative tokens and the VQ decoder in one function (jit it
    whole); the drafts' code vectors are the tokenizer's codebook."""
    vq = bind(vq_graphdef, vq_params)
    tokens, stats = sample(graphdef, params, key, labels, scfg, cfg, draft,
                           vq.quantize.codebook(), neighbours)
    return Samples(vq.decode(tokens), {"tokens": tokens}, summary_stats(stats))
