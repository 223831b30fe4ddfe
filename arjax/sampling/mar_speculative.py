"""Continuous speculative decoding (CSpD, Wang et al. 2024) between a draft and a target MAR.

After `ratio * num_iter` steps of the target alone (pre-filling), the draft runs the MAR
steps; every `num_draft` steps (and at the last) the target verifies the window W of tokens
drafted since the last verification in one pass: it sees only the verified context and
predicts all of W at once, its diffusion chains drawing the same per-position noise as the
draft's (trajectory alignment, `sampling.mar.position_noise`). Each token of W is then
accepted or replaced independently, from the two chains' last-step Gaussians
p = N(mu_p, s_p^2), q = N(mu_q, s_q^2) (diagonal over the C channels):

- rule "exact" (the paper's criterion): both chains also draw noise at their last step, so
  given the shared earlier noises the draft token x ~ q and the target's token ~ p exactly;
  accept with min(1, p(x) / q(x)), else draw from (p - q)_+ by acceptance-rejection with
  proposal p (`residual_proposals` per round, up to `residual_rounds` rounds; a token that finds
  none takes the target's own sample and is counted in `residual_fallbacks`). Lossless with
  respect to the target run with one step per window (tokens of W are conditionally
  independent given the context, as in one MAR step), up to the counted fallbacks.
- rule "official" (MarkXCloud/CSpD `SpecDecodeRunner`): tokens are the chains' last means (no
  last-step noise); log R = sum(Lambda_p - Lambda_q) + sum(log s_q - log s_p)
  - (1 / 2 tau^2) sum[((x - mu_p) / s_p)^2 - ((x - mu_q) / s_q)^2] with Lambda the sum of the
  earlier steps' log sigmas and tau = `inner_temperature` (42); the residual accepts y ~ p with
  max(0, p(y) - q(y) / F) / p(y), F = exp(sum(Lambda_p - Lambda_q)), one proposal per round,
  100 rounds. Approximate (not lossless): `docs/benchmarks.md` measures its deviation. The
  official code leaves a token that finds no residual sample at zero; here it takes the target's
  sample.

The guidance weight of the whole window is the one of its last draft step (official). Static
shapes: the schedule (pre-fill steps, windows) is a host table; the pre-fill steps run as the
plain sampler's (`run_steps`) and the windows as `sample.segments` runs (`window_runs`, chosen
for the least padded work of both models), each a `lax.scan` over its windows compiled with
its own encoder cap and gathered token counts, the draft steps of a window a `fori_loop`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from arjax.config import check
from arjax.models import bind
from arjax.sampling.generator import Samples
from arjax.sampling.mar import (
    MARSampleConfig,
    chain_cost,
    cheapest_runs,
    guidance_weights,
    latent_rms,
    mask_schedule,
    predict,
    run_steps,
    scatter,
    start,
    suffix_max,
    token_cost,
)

RULES = ("exact", "official")


@dataclasses.dataclass(frozen=True)
class CSpDConfig:
    enabled: bool = False  # experiments: sample with CSpD (trains or loads the draft MAR)
    num_draft: int = 8  # gamma: draft steps between verifications (official demo: 4)
    ratio: float = 0.15  # steps s <= ratio * num_iter are the target's alone (demo: 0.05)
    rule: str = "exact"  # exact (lossless) | official (the released code's tempered ratio)
    inner_temperature: float = 42.0  # tau of the official rule
    residual_proposals: int = 16  # proposals per residual round (official rule: 1)
    residual_rounds: int = 100

    def validate(self) -> None:
        check(self.num_draft >= 1, f"speculative.num_draft must be >= 1, got {self.num_draft}")
        check(0 <= self.ratio < 1, f"speculative.ratio must be in [0, 1), got {self.ratio}")
        check(self.rule in RULES, f"speculative.rule must be one of {RULES}, got "
              f"{self.rule!r}")
        check(self.inner_temperature > 0 and self.residual_proposals >= 1
              and self.residual_rounds >= 1, "speculative.inner_temperature, "
              "residual_proposals and residual_rounds must be positive")


def schedule(num_iter: int, cfg: CSpDConfig) -> tuple[int, np.ndarray]:
    """(pre-fill steps P, windows [n, 2] of (first, last) draft step): step s >= P is
    drafted; a verification follows draft step s when s % num_draft == 0 or s is the last."""
    prefill = min(num_iter, math.floor(cfg.ratio * num_iter) + 1)
    windows, begin = [], prefill
    for s in range(prefill, num_iter):
        if s % cfg.num_draft == 0 or s == num_iter - 1:
            windows.append((begin, s))
            begin = s + 1
    return prefill, np.asarray(windows, np.int32).reshape(-1, 2)


def _log_density(x, mean, std):
    """log N(x; mean, std^2) summed over the channels: [..., C] -> [...]."""
    z = (x - mean) / std
    return jnp.sum(-0.5 * z * z - jnp.log(std) - 0.5 * math.log(2 * math.pi), axis=-1)


def residual(key, p, q, log_offset, proposals: int, rounds: int):
    """Draws from (p - q / exp(log_offset))_+ by acceptance-rejection with proposal p, for N
    tokens at once: p, q = (mean, std) each [N, C]. -> (samples [N, C], found [N])."""
    (mu_p, s_p), (mu_q, s_q) = p, q
    n, c = mu_p.shape

    def body(state):
        r, found, out = state
        k_y, k_u = jax.random.split(jax.random.fold_in(key, r))
        y = mu_p[:, None] + s_p[:, None] * jax.random.normal(k_y, (n, proposals, c))
        ratio = jnp.exp(_log_density(y, mu_q[:, None], s_q[:, None]) - log_offset[:, None]
                        - _log_density(y, mu_p[:, None], s_p[:, None]))
        ok = jax.random.uniform(k_u, (n, proposals)) < jnp.maximum(0.0, 1.0 - ratio)
        first = jnp.argmax(ok, axis=1)
        take = ~found & ok.any(axis=1)
        out = jnp.where(take[:, None], y[jnp.arange(n), first], out)
        return r + 1, found | take, out

    _, found, out = jax.lax.while_loop(lambda s: (s[0] < rounds) & ~jnp.all(s[1]), body,
                                       (0, jnp.zeros((n,), bool), jnp.zeros_like(mu_p)))
    return out, found


def verify(key, rule: CSpDConfig, x_q, q, x_p, p):
    """Per token (flattened [N, C]): the draft token x_q with its last-step Gaussian
    q = (mean, std, sum of earlier log sigmas), the target's sample x_p and p alike ->
    (tokens [N, C], accepted [N], fallbacks [N], log acceptance ratio [N], log of the official
    rule's trajectory factor F [N] (reported under either rule: it says how far the two
    chains' variances drifted apart))."""
    (mu_q, s_q, lam_q), (mu_p, s_p, lam_p) = q, p
    k_u, k_res = jax.random.split(key)
    u = jax.random.uniform(k_u, x_q.shape[:1])
    log_f = jnp.sum(lam_p - lam_q, axis=-1)
    if rule.rule == "exact":
        log_r = _log_density(x_q, mu_p, s_p) - _log_density(x_q, mu_q, s_q)
        log_offset, proposals = jnp.zeros_like(log_r), rule.residual_proposals
    else:
        quad = jnp.sum(((x_q - mu_p) / s_p) ** 2 - ((x_q - mu_q) / s_q) ** 2, axis=-1)
        log_r = (log_f + jnp.sum(jnp.log(s_q) - jnp.log(s_p), axis=-1)
                 - quad / (2 * rule.inner_temperature**2))
        log_offset, proposals = log_f, 1
    accepted = jnp.log(u) < log_r
    y, found = residual(k_res, (mu_p, s_p), (mu_q, s_q), log_offset, proposals,
                        rule.residual_rounds)
    y = jnp.where(found[:, None], y, x_p)
    return jnp.where(accepted[:, None], x_q, y), accepted, ~accepted & ~found, log_r, log_f


def window_runs(m: np.ndarray, first: np.ndarray, windows: np.ndarray, count: int,
                draft: tuple[float, float] = (1.0, 1.0), target: tuple[float, float] = (1.0, 1.0)):
    """The windows in up to `count` runs, each compiled with its own shapes (as
    `sampling.mar.segments` does for plain steps) -> [(windows [n, 2], (encoder cap = the
    most tokens known at any of the run's steps, the most tokens a draft step predicts, the
    most tokens a window verifies))]. Early windows predict few tokens, so the boundaries
    minimise the padded work (`cheapest_runs`): per window, its draft steps x (cap + draft
    chain x draft width) in draft tokens plus one target pass, cap + target chain x window
    width in target tokens; `draft`, `target` = each model's (`token_cost`, `chain_cost`)."""
    if not len(windows):
        return []
    length, (a, b) = int(m[0]), windows.T
    caps = np.maximum(1, length - m[b]).astype(np.float64)
    steps = (b - a + 1).astype(np.float64)
    widths = np.array([np.max(m[x:y + 1] - first[x:y + 1]) for x, y in windows], np.float64)
    verified = (m[a] - first[b]).astype(np.float64)

    def work(starts, end):
        drafted = np.cumsum(steps[:end][::-1])[::-1]  # draft steps of windows start..end-1
        return (drafted * draft[0] * (caps[end - 1] + draft[1] * suffix_max(widths[:end]))
                + (end - starts) * target[0] * (caps[end - 1]
                                                + target[1] * suffix_max(verified[:end])))

    return [(windows[x:y], (int(caps[y - 1]), int(widths[x:y].max()),
                            int(verified[x:y].max())))
            for x, y in cheapest_runs(len(windows), count, work)]


def sample_latents(target, draft, key: jax.Array, labels: jax.Array, cfg: MARSampleConfig,
                   spec: CSpDConfig, noise=None, ranks=None) -> tuple[jax.Array, dict]:
    """target, draft = (graphdef, params) of two MARs over the same tokens; labels int [B]
    -> (latents [B, s, s, C], stats: target_passes, draft_passes, drafted / accepted tokens,
    acceptance, mean_accepted_per_round, residual_fallbacks, mean_log_ratio (log of the
    acceptance ratio, averaged over drafted tokens), mean_log_trajectory_factor)."""
    t_model, d_model = bind(*target), bind(*draft)
    mcfg = t_model.cfg
    check(d_model.cfg.seq_len == mcfg.seq_len and d_model.cfg.token_dim == mcfg.token_dim
          and d_model.cfg.num_classes == mcfg.num_classes,
          "CSpD's draft and target MAR must share side, token_dim and num_classes")
    cfg.validate(mcfg.seq_len)
    spec.validate()
    canvas = start(t_model, key, labels, cfg, noise, ranks)
    d_canvas = canvas._replace(cond=start(d_model, key, labels, cfg, noise, canvas.ranks).cond)
    m_host, first_host = mask_schedule(mcfg.seq_len, cfg.num_iter)
    prefill, windows = schedule(cfg.num_iter, spec)
    weights = jnp.asarray(guidance_weights(cfg, m_host, mcfg.seq_len), jnp.float32)
    m, first = jnp.asarray(m_host), jnp.asarray(first_host)
    final = spec.rule == "exact" or cfg.final_noise

    tokens = run_steps(t_model, canvas, canvas.tokens, cfg, prefill, final)
    verify_key = jax.random.fold_in(canvas.noise_key, mcfg.seq_len)

    def window(carry, ab, shapes):
        tokens, counts = carry
        a, b = ab[0], ab[1]
        cap, width, window_width = shapes

        def draft_step(s, state):
            toks, gauss = state
            idx, valid, new, *q = predict(d_model, d_canvas._replace(tokens=toks), m[s],
                                          first[s], m[s], width, weights[s], cfg, final, cap)
            return (scatter(toks, idx, valid, new),
                    tuple(scatter(g, idx, valid, v) for g, v in zip(gauss, q)))

        zeros = jnp.zeros_like(tokens)
        drafted, gauss = jax.lax.fori_loop(a, b + 1, draft_step, (tokens, (zeros,) * 3))
        idx, valid, x_p, *p = predict(t_model, canvas._replace(tokens=drafted), m[a],
                                      first[b], m[a], window_width, weights[b], cfg, final, cap)
        flat = lambda arr: arr.reshape(-1, arr.shape[-1])
        at = lambda arr: flat(jnp.take_along_axis(arr, idx[..., None], axis=1))
        new, accepted, fallback, log_r, log_f = verify(
            jax.random.fold_in(verify_key, a), spec, at(drafted), tuple(at(g) for g in gauss),
            flat(x_p), tuple(flat(g) for g in p))
        batch = idx.shape[0]
        mask = jnp.broadcast_to(valid, idx.shape).reshape(-1)
        counts = {"drafted": counts["drafted"] + jnp.sum(mask),
                  "accepted": counts["accepted"] + jnp.sum(accepted & mask),
                  "residual_fallbacks": counts["residual_fallbacks"] + jnp.sum(fallback & mask),
                  "draft_passes": counts["draft_passes"] + b + 1 - a,
                  "windows": counts["windows"] + 1,
                  "log_ratio": counts["log_ratio"] + jnp.sum(jnp.where(mask, log_r, 0.0)),
                  "log_factor": counts["log_factor"] + jnp.sum(jnp.where(mask, log_f, 0.0))}
        return (scatter(drafted, idx, valid, new.reshape(batch, -1, new.shape[-1])), counts), None

    zero = jnp.int32(0)
    counts = dict(drafted=zero, accepted=zero, residual_fallbacks=zero, draft_passes=zero,
                  windows=zero, log_ratio=jnp.float32(0), log_factor=jnp.float32(0))
    costs = [(token_cost(model.cfg), chain_cost(model.cfg, cfg.diffusion_steps))
             for model in (d_model, t_model)]
    for run, shapes in window_runs(m_host, first_host, windows, cfg.segments, *costs):
        (tokens, counts), _ = jax.lax.scan(functools.partial(window, shapes=shapes),
                                           (tokens, counts), jnp.asarray(run))
    drafted = jnp.maximum(counts["drafted"], 1)
    stats = {"target_passes": prefill + counts["windows"],
             "draft_passes": counts["draft_passes"],
             "acceptance": counts["accepted"] / drafted,
             "mean_accepted_per_round": counts["accepted"] / (labels.shape[0] * jnp.maximum(
                 counts["windows"], 1)),
             "residual_fallbacks": counts["residual_fallbacks"],
             "mean_log_ratio": counts["log_ratio"] / drafted,
             "mean_log_trajectory_factor": counts["log_factor"] / drafted,
             "nfe": (prefill + counts["windows"] + counts["draft_passes"]) * cfg.diffusion_steps,
             "latent_rms": latent_rms(tokens)}
    return tokens.reshape(-1, mcfg.side, mcfg.side, mcfg.token_dim), stats


def sample(target, draft, vae_graphdef, vae_params, key: jax.Array, labels: jax.Array,
           cfg: MARSampleConfig, spec: CSpDConfig, latent_scale: float) -> Samples:
    """The sampler contract: CSpD latents and the KL-VAE decoder in one function."""
    latents, stats = sample_latents(target, draft, key, labels, cfg, spec)
    images = bind(vae_graphdef, vae_params).decode(latents, latent_scale)
    return Samples(images, {"latents": latents}, stats)
