"""MAR sampling (`sample_tokens`): masked generation in a random order, a diffusion chain per
predicted token.

All L tokens start unknown, in a random order per sample. Step s of `num_iter` runs the trunk
on the known tokens (the batch doubled to [cond; null] with CFG), then predicts the tokens whose
place in the order lies in [m_{s+1}, m_s), where m_{s+1} = floor(L cos(pi/2 (s+1)/num_iter))
clamped to [1, m_s - 1] (MaskGIT's cosine schedule; the last step predicts all that remain).
Each predicted token runs the diffusion MLP's reverse chain (`diffusion_steps`, temperature
scaling the noise) with eps = eps_null + w (eps_cond - eps_null) and the cond half's variance,
w = 1 + (cfg - 1)(L - m_{s+1}) / L ("linear", Muse's) or cfg ("constant").

Static shapes: the mask counts are a host table, so every step gathers a fixed K = the largest
number of tokens any step predicts (rows past a step's count are computed and dropped); the
steps are one `lax.fori_loop`, each chain a `lax.scan`. Noise can be supplied (`noise`:
initial [B, L, C] and per-step [B, L, T, C] by token position, as CSpD's reference code
takes it) for parity tests; by default it is drawn per step from the key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from arjax.config import check
from arjax.models import bind
from arjax.models.mar import diffusion, random_ranks
from arjax.sampling.common import cfg_combine, check_guidance
from arjax.sampling.generator import Samples


@dataclasses.dataclass(frozen=True)
class MARSampleConfig:
    num_iter: int = 64  # generation steps (the official FID protocol: 256)
    cfg: float = 1.0  # guidance weight w; 1 = off
    cfg_schedule: str = "linear"  # linear: w grows with the share of known tokens
    temperature: float = 1.0  # tau: scales the diffusion chain's noise
    diffusion_steps: int = 100  # respaced reverse-chain steps per token
    final_noise: bool = False  # the chain's last step draws noise too (upstream: none); the
    # law CSpD's exact rule reproduces
    segments: int = 4  # runs of steps compiled with their own token counts (speed vs compile;
    # at most num_iter are used; see `segments`)

    def validate(self, seq_len: int | None = None) -> None:
        check(self.num_iter >= 1, f"sample.num_iter must be >= 1, got {self.num_iter}")
        check_guidance(self.cfg, self.cfg_schedule)
        check(self.temperature >= 0, f"sample.temperature must be >= 0, got "
              f"{self.temperature}")
        check(1 <= self.diffusion_steps <= 1000, f"sample.diffusion_steps must be in "
              f"[1, 1000], got {self.diffusion_steps}")
        check(self.segments >= 1, f"sample.segments must be >= 1, got {self.segments}")
        if seq_len is not None:
            check(self.num_iter <= seq_len, f"sample.num_iter={self.num_iter} must be <= "
                  f"the {seq_len} tokens (a step predicts at least one)")


def mask_schedule(seq_len: int, num_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """(m [num_iter + 1]: unknown tokens before each step and after the last,
    first [num_iter]: the first order place predicted at each step). Step s predicts the
    places first[s]..m[s] - 1."""
    m = [seq_len]
    for s in range(num_iter):
        nxt = math.floor(seq_len * np.cos(math.pi / 2.0 * (s + 1) / num_iter))
        m.append(max(1, min(m[-1] - 1, nxt)))
    m = np.asarray(m, np.int32)
    first = np.append(m[1:-1], 0).astype(np.int32)
    return m, first


class Canvas(NamedTuple):
    """The state every MAR sampler shares: tokens [B, L, C], each position's place in the
    generation order (ranks [B, L]) and the order itself (order[b, j] = position of place
    j), the conditioning rows (doubled with CFG) and the noise source."""
    tokens: jax.Array
    ranks: jax.Array
    order: jax.Array
    cond: jax.Array
    noise_key: jax.Array
    noise: tuple[jax.Array, jax.Array] | None


def start(model, key: jax.Array, labels: jax.Array, cfg: MARSampleConfig,
          noise=None, ranks: jax.Array | None = None) -> Canvas:
    mcfg = model.cfg
    batch = labels.shape[0]
    k_order, k_noise = jax.random.split(key)
    if ranks is None:
        ranks = random_ranks(k_order, batch, mcfg.seq_len)
    cond = model.conditioning(labels.astype(jnp.int32))
    if cfg.cfg != 1:
        cond = jnp.concatenate([cond, model.conditioning(labels, jnp.ones_like(labels, bool))])
    return Canvas(jnp.zeros((batch, mcfg.seq_len, mcfg.token_dim)), ranks,
                  jnp.argsort(ranks, axis=-1), cond, k_noise, noise)


def guidance_weights(cfg: MARSampleConfig, m: np.ndarray, length: int) -> np.ndarray:
    """The guidance weight of each step (m: the schedule's unknown counts)."""
    if cfg.cfg_schedule == "linear":
        return 1 + (cfg.cfg - 1) * (length - m[1:]) / length
    return np.full(len(m) - 1, cfg.cfg)


def position_noise(canvas: Canvas, idx: jax.Array, steps: int, c: int):
    """The chain noise of the tokens at positions idx [B, K] -> (init [B, K, C],
    per-step [B, K, T, C]): a function of (row, position) only, so every model's chain for a
    token draws the same noise (CSpD's trajectory alignment) whatever step predicts it."""
    if canvas.noise is not None:
        rows = jnp.arange(idx.shape[0])[:, None]
        return jnp.asarray(canvas.noise[0])[rows, idx], jnp.asarray(canvas.noise[1])[rows, idx]
    keys = jax.vmap(lambda row, ids: jax.vmap(lambda i: jax.random.fold_in(row, i))(ids))(
        jax.random.split(canvas.noise_key, idx.shape[0]), idx)
    drawn = jax.vmap(jax.vmap(lambda k: jax.random.normal(k, (1 + steps, c))))(keys)
    return drawn[:, :, 0], drawn[:, :, 1:]


def cheapest_runs(n: int, count: int, work) -> list[tuple[int, int]]:
    """Items 0..n-1 in up to `count` contiguous runs (first, end) that minimise the summed
    `work(starts, end)`: the padded work of runs starts..end-1 for an array of starts (each
    run compiles with shapes that fit its widest item). An exact dynamic programme over the
    boundaries."""
    count = min(count, n)
    # best[j][b]: least work of items 0..b-1 in j runs; cut[j][b]: where its last run begins
    best = np.full((count + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    cut = np.zeros((count + 1, n + 1), np.int64)
    for b in range(1, n + 1):
        cost = work(np.arange(b), b)
        for j in range(1, count + 1):
            total = best[j - 1, :b] + cost
            cut[j, b] = int(np.argmin(total))
            best[j, b] = total[cut[j, b]]
    runs, end = [], n
    for j in range(count, 0, -1):
        runs.append((int(cut[j, end]), end))
        end = runs[-1][0]
    return runs[::-1]


def suffix_max(values: np.ndarray) -> np.ndarray:
    """[max(values[a:]) for each a]: the widest item of every run that ends at the end."""
    return np.maximum.accumulate(values[::-1])[::-1]


def segments(m: np.ndarray, first: np.ndarray, count: int, chain_cost: float = 1.0
             ) -> list[tuple[int, int, int, int]]:
    """The steps in up to `count` runs -> (first step, end step, encoder cap = the most tokens
    known at a step start, width = the most tokens a step predicts): each run compiles with its
    own shapes, so the encoder sees about as many tokens as the official one (which drops the
    unknown ones) and the diffusion chains about as many rows. Early steps predict one token,
    late ones several, so the run boundaries minimise the padded work, sum over runs of steps x
    (cap + `chain_cost` x width), with `chain_cost` a predicted token's diffusion chain in
    encoder tokens (the function `chain_cost`; docs/benchmarks.md, eighth stop, counts what it
    saves for MAR-B)."""
    length, n = int(m[0]), len(first)
    caps = np.maximum(1, length - m[:n]).astype(np.float64)  # non-decreasing in the step
    widths = (m[:n] - first).astype(np.float64)
    runs = cheapest_runs(n, count, lambda starts, b: (b - starts) * (
        caps[b - 1] + chain_cost * suffix_max(widths[:b])))
    return [(a, b, int(caps[b - 1]), int(widths[a:b].max())) for a, b in runs]


def token_cost(cfg) -> float:
    """Matmul weights one token meets in a trunk stack (attention and MLP of each block): the
    unit of `chain_cost`, and how draft and target passes compare (CSpD's `window_runs`)."""
    return cfg.depth * (4 + 2 * cfg.mlp_ratio) * cfg.width**2


def chain_cost(cfg, diffusion_steps: int) -> float:
    """A predicted token's diffusion chain in encoder tokens (matmul weights per row: the
    head's res blocks and final layer, AdaLN included, at every step, over `token_cost`):
    `segments`' weight of the two kinds of padding."""
    return diffusion_steps * (5 * cfg.head_depth + 2) * cfg.head_width**2 / token_cost(cfg)


def predict(model, canvas: Canvas, known_below, first, last, width: int, weight,
            cfg: MARSampleConfig, final_noise: bool = False, cap: int | None = None):
    """One MAR step: the trunk sees the tokens whose place >= `known_below` (the encoder on
    `cap` tokens, see `MAR.__call__`), and the places first..last-1 of the order are predicted
    (`width` gathered; the rest are dropped) by the guided diffusion chain. -> (positions
    [B, K], valid [K], tokens [B, K, C], the last step's (mean, std, sum of earlier log
    sigmas) each [B, K, C])."""
    batch, length, c = canvas.tokens.shape
    guided = cfg.cfg != 1
    double = (lambda a: jnp.concatenate([a, a])) if guided else (lambda a: a)
    z = model(double(canvas.tokens), double(canvas.ranks >= known_below), canvas.cond,
              cap=cap)
    place = first + jnp.arange(width)
    valid = place < last
    idx = jnp.take_along_axis(canvas.order, jnp.broadcast_to(
        jnp.minimum(place, length - 1), (batch, width)), axis=1)
    zc = model.diffloss.condition(jnp.take_along_axis(z, double(idx)[..., None], axis=1))
    zc = zc.reshape(-1, zc.shape[-1])
    process = diffusion(model.cfg.noise_schedule, cfg.diffusion_steps)
    init, inter = position_noise(canvas, idx, process.steps, c)

    head = model.diffloss

    def net(x, mods):
        out = head.denoise_modulated(double(x), mods)
        if not guided:
            return out
        (eps_c, var_c), (eps_u, _) = (jnp.split(h, 2, -1) for h in jnp.split(out, 2))
        return jnp.concatenate([cfg_combine(eps_c, eps_u, weight), var_c], -1)

    # the chain's j-th step (step index T-1-j) draws inter[:, :, j]
    steps_first = jnp.moveaxis(inter, 2, 0)[::-1].reshape(process.steps, -1, c)
    out = process.chain(net, init.reshape(-1, c), steps_first, cfg.temperature, final_noise,
                        prepare=lambda t: head.modulations(t, zc),
                        chunk=modulation_chunk(head, zc.shape[0], process.steps))
    return idx, valid, *(a.reshape(batch, width, c) for a in out)


MODULATION_BYTES = 64 * 2**20  # per run of chain steps: big enough for large-row matmuls


def modulation_chunk(head, rows: int, steps: int) -> int:
    """How many chain steps' AdaLN modulations to compute at once: the most (a divisor of
    `steps`) whose float32 modulations for `rows` rows fit in MODULATION_BYTES."""
    per_step = 4 * rows * sum(layer.adaLN_modulation.kernel.shape[1]
                              for layer in (*head.res_blocks, head.final_layer))
    return max(d for d in range(1, steps + 1)
               if steps % d == 0 and (d == 1 or d * per_step <= MODULATION_BYTES))


def scatter(tokens: jax.Array, idx: jax.Array, valid: jax.Array, values: jax.Array):
    """tokens [B, L, ...] with values [B, K, ...] written at idx where valid."""
    rows = jnp.arange(idx.shape[0])[:, None]
    return tokens.at[rows, jnp.where(valid, idx, tokens.shape[1])].set(
        values.astype(tokens.dtype), mode="drop")


def latent_rms(tokens: jax.Array) -> jax.Array:
    """Root mean square of the sampled (scaled) latents: the training latents have unit
    variance, so a value far above 1 says the diffusion chains diverged (MAR's first sampling
    step multiplies the head's eps error by 1 / sqrt(alpha_bar) ~ 2e4: an undertrained head
    explodes there)."""
    return jnp.sqrt(jnp.mean(jnp.square(tokens.astype(jnp.float32))))


def run_steps(model, canvas: Canvas, tokens: jax.Array, cfg: MARSampleConfig, steps: int,
              final_noise: bool = False) -> jax.Array:
    """MAR steps 0..steps-1 of the schedule on `tokens`, as `cfg.segments` runs (each a
    `fori_loop` compiled with its own encoder cap and token count): the plain sampler's whole
    loop and CSpD's pre-fill."""
    length = model.cfg.seq_len
    m_host, first_host = mask_schedule(length, cfg.num_iter)
    weights = jnp.asarray(guidance_weights(cfg, m_host, length), jnp.float32)
    m, first = jnp.asarray(m_host), jnp.asarray(first_host)
    for begin, end, cap, width in segments(m_host, first_host[:steps], cfg.segments,
                                           chain_cost(model.cfg, cfg.diffusion_steps)):
        def step(s, tokens, cap=cap, width=width):
            idx, valid, new, *_ = predict(model, canvas._replace(tokens=tokens), m[s],
                                          first[s], m[s], width, weights[s], cfg,
                                          final_noise, cap)
            return scatter(tokens, idx, valid, new)
        tokens = jax.lax.fori_loop(begin, end, step, tokens)
    return tokens


def sample_latents(graphdef, params, key: jax.Array, labels: jax.Array, cfg: MARSampleConfig,
                   noise: tuple[jax.Array, jax.Array] | None = None, ranks: jax.Array | None
                   = None) -> tuple[jax.Array, dict]:
    """labels int [B] -> (latents [B, s, s, C] scaled, stats). `ranks` [B, L]: each
    position's place in the order (default: random from `key`)."""
    model = bind(graphdef, params)
    mcfg = model.cfg
    cfg.validate(mcfg.seq_len)
    canvas = start(model, key, labels, cfg, noise, ranks)
    tokens = run_steps(model, canvas, canvas.tokens, cfg, cfg.num_iter, cfg.final_noise)
    stats = {"target_passes": jnp.int32(cfg.num_iter),
             "nfe": jnp.int32(cfg.num_iter * cfg.diffusion_steps),
             "latent_rms": latent_rms(tokens)}
    return tokens.reshape(-1, mcfg.side, mcfg.side, mcfg.token_dim), stats


def sample(graphdef, params, vae_graphdef, vae_params, key: jax.Array, labels: jax.Array,
           cfg: MARSampleConfig, latent_scale: float,
           noise: tuple[jax.Array, jax.Array] | None = None) -> Samples:
    """labels int [B] -> Samples(images [B, H, W, 3] in [-1, 1], {"latents": scaled latents},
    {"target_passes": trunk passes, "nfe": diffusion-MLP calls per token chain x steps,
    "latent_rms": see `latent_rms`})."""
    latents, stats = sample_latents(graphdef, params, key, labels, cfg, noise)
    images = bind(vae_graphdef, vae_params).decode(latents, latent_scale)
    return Samples(images, {"latents": latents}, stats)
