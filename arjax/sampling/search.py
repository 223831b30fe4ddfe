"""TTS-VAR (arXiv 2507.18537): test-time search over the scales of a class-conditional VAR.

Each label starts with C candidate paths; after every scale the number kept follows a
descending schedule (`batch_schedule`, the paper's `bs_sis`). A decrease happens only at a
*cluster* scale (coarse: structure features of the decoded candidates, k-means into the next
count, the member nearest each centroid is kept: diversity) or a *resample* scale (fine:
rewards -> potentials exp(lambda R), multinomial draw with replacement: quality). The final
image of each label is the candidate of highest reward. Selection gathers the whole decoding
state (KV caches of both CFG halves, f_hat, next input, codes so far) with one pytree gather;
every (scale, candidate count) has its own compiled step, so shapes stay static.

`features(images) -> [N, P, D]` (spatial features: the paper's DINOv2 patch tokens) and
`reward(images, labels) -> [N]` are plain host functions; `digits_features` /
`digits_reward` use the project's digits classifier.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from arjax.config import check
from arjax.models import bind
from arjax.nn.scales import scale_bounds
from arjax.sampling.generator import Samples
from arjax.sampling.var import VARSampleConfig, _draw, _start

POTENTIALS = ("value", "diff", "max", "sum")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    batch_schedule: tuple[int, ...] = (8, 8, 6, 6, 4, 2, 2, 1, 1, 1)  # kept after each scale
    cluster_scales: tuple[int, ...] = (2, 4)  # diversity (k-means on structure features)
    resample_scales: tuple[int, ...] = (5, 7)  # potentials exp(lambda R), with replacement
    potential: str = "value"  # value | diff (R_t - R_t-1) | max (over history) | sum
    lam: float = 10.0

    def validate(self, scales: int) -> None:
        s = self.batch_schedule
        check(len(s) == scales and all(n >= 1 for n in s),
              f"search.batch_schedule needs {scales} counts >= 1 (one per scale), got {s}")
        check(self.potential in POTENTIALS,
              f"search.potential must be one of {POTENTIALS}, got {self.potential!r}")
        for k in range(scales):
            before = s[k - 1] if k else s[0]
            check(s[k] <= before, f"search.batch_schedule must not grow: {s}")
            check(s[k] == before or k in self.cluster_scales or k in self.resample_scales
                  or k == scales - 1,
                  f"search.batch_schedule drops from {before} to {s[k]} at scale {k}, which "
                  "is neither a cluster nor a resample scale")
        check(not set(self.cluster_scales) & set(self.resample_scales),
              "a scale cannot be both a cluster and a resample scale")
        check(all(0 <= k < scales - 1 for k in (*self.cluster_scales, *self.resample_scales)),
              f"cluster and resample scales must lie in [0, {scales - 2}] (the last scale "
              "keeps the candidate of highest reward)")


def potentials(history: np.ndarray, kind: str, lam: float) -> np.ndarray:
    """Rewards so far [T, N] (the last row is this scale's) -> potentials [N]."""
    r = {"value": history[-1], "max": history.max(0), "sum": history.sum(0),
         "diff": history[-1] - (history[-2] if len(history) > 1 else 0.0)}[kind]
    return np.exp(lam * (r - np.max(r)))  # shifted: the same draw, no overflow


def resample(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
    """n indices drawn with replacement in proportion to `weights`; uniform when the weights
    are not finite or sum to zero (the official NaN / zero guard)."""
    w = np.asarray(weights, np.float64)
    if not np.all(np.isfinite(w)) or w.sum() <= 0:
        w = np.ones_like(w)
    return rng.choice(len(w), size=n, replace=True, p=w / w.sum())


def structure_vectors(patch_features: np.ndarray) -> np.ndarray:
    """[N, P, D] spatial features -> [N, P]: each image's centred features projected on their
    first principal direction (sign fixed so the largest |value| is positive; SVD's sign is
    arbitrary and would split identical layouts)."""
    out = []
    for f in np.asarray(patch_features, np.float64):
        f = f - f.mean(0)
        v = np.linalg.svd(f, full_matrices=False)[2][0]
        p = f @ v
        out.append(p * np.sign(p[np.argmax(np.abs(p))] or 1.0))
    return np.stack(out)


def cluster_select(vectors: np.ndarray, k: int) -> np.ndarray:
    """k-means (sklearn, random_state 0, as the official code) into k clusters; the index of
    the member nearest each centroid, in cluster order."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, random_state=0, n_init=10).fit(vectors)
    picks = []
    for c in range(k):
        members = np.flatnonzero(km.labels_ == c)
        d = np.linalg.norm(vectors[members] - km.cluster_centers_[c], axis=1)
        picks.append(members[np.argmin(d)])
    return np.asarray(picks)


@functools.partial(jax.jit, static_argnames=("graphdef", "vae_graphdef", "k", "cfg", "batch",
                                             "decode"))
def _scale_step(graphdef, params, vae_graphdef, vae_params, state, labels, key, k: int,
                cfg: VARSampleConfig, batch: int, decode: bool = True):
    """Scale k for `batch` candidates: -> (state with this scale's codes, the decoded images
    when `decode`, else None: only selection scales and the last need them)."""
    model, vae = bind(graphdef, params), bind(vae_graphdef, vae_params)
    mcfg = model.cfg
    scales, side = len(mcfg.patch_nums), mcfg.patch_nums[-1]
    begin, end = scale_bounds(mcfg.patch_nums)[k]
    s = _start(model, labels, cfg.cfg != 1)
    logits, cache = model.decode_scale(state["x"], s.cond, s.block_cond, state["cache"], begin)
    codes, h = _draw(logits, k, key, cfg, batch, scales,
                     vae.quantize.embedding.embedding[...])
    f_hat, nxt = vae.quantize.next_input(k, state["f_hat"], h, side)
    x = state["x"]
    if nxt is not None:
        x = model.embed(None, jnp.concatenate([nxt, nxt]) if cfg.cfg != 1 else nxt, end)
    new = {"cache": cache, "f_hat": f_hat, "x": x,
           "codes": state["codes"].at[:, begin:end].set(codes)}
    return new, vae.decode_f_hat(f_hat) if decode else None


def gather(state: dict, rows: np.ndarray, guided: bool) -> dict:
    """Keeps candidates `rows` of every array of the decoding state: the batch axis of f_hat
    and codes, and rows (i, B + i) of the doubled CFG batch of the caches and the input."""
    batch = state["f_hat"].shape[0]
    rows = jnp.asarray(rows)
    doubled = jnp.concatenate([rows, rows + batch]) if guided else rows
    return {"cache": jax.tree.map(lambda a: a[doubled], state["cache"]),
            "x": state["x"][doubled], "f_hat": state["f_hat"][rows],
            "codes": state["codes"][rows]}


def search_sample(graphdef, params, vae_graphdef, vae_params, key: jax.Array,
                  labels: np.ndarray, cfg: VARSampleConfig, search: SearchConfig,
                  reward: Callable, features: Callable | None = None, seed: int = 0
                  ) -> tuple[Samples, dict]:
    """TTS-VAR for each label: -> (Samples of the chosen candidates, search stats: token
    passes and VAE decodes per final image, the final rewards)."""
    model = bind(graphdef, params)
    mcfg = model.cfg
    scales, side = len(mcfg.patch_nums), mcfg.patch_nums[-1]
    cfg.validate(mcfg.vocab_size, scales)
    search.validate(scales)
    check(not search.cluster_scales or features is not None,
          "search.cluster_scales need a features function")
    labels = np.asarray(labels, np.int32)
    n_labels, guided = len(labels), cfg.cfg != 1
    count = search.batch_schedule[0]
    rows_labels = np.repeat(labels, count)
    rng = np.random.default_rng(seed)
    s = _start(model, jnp.asarray(rows_labels), guided)
    state = {"cache": s.cache, "x": model.embed(s.cond, None, 0),
             "f_hat": jnp.zeros((len(rows_labels), side, side, mcfg.codebook_dim)),
             "codes": jnp.zeros((len(rows_labels), mcfg.seq_len), jnp.int32)}
    history: list[np.ndarray] = []  # rewards [labels, count] at each scored scale
    tokens = decodes = 0
    for k in range(scales):
        n = len(rows_labels)
        select = k in search.cluster_scales or k in search.resample_scales or k == scales - 1
        state, images = _scale_step(graphdef, params, vae_graphdef, vae_params, state,
                                    jnp.asarray(rows_labels), key, k, cfg, n, select)
        tokens += n * (2 if guided else 1) * mcfg.patch_nums[k] ** 2
        decodes += n if select else 0
        keep, picks = search.batch_schedule[k], None
        if k in search.cluster_scales:
            vectors = structure_vectors(features(np.asarray(images)))
            picks = [cluster_select(v, keep) for v in vectors.reshape(n_labels, count, -1)]
        if k in search.resample_scales or k == scales - 1:
            r = np.asarray(reward(np.asarray(images), rows_labels), np.float64)
            history.append(r.reshape(n_labels, count))
            if k == scales - 1:
                keep, picks = 1, [np.array([np.argmax(h)]) for h in history[-1]]
            else:
                h = np.stack(history)
                picks = [resample(rng, potentials(h[:, i], search.potential, search.lam),
                                  keep) for i in range(n_labels)]
        if picks is None or (keep == count and k == scales - 1 and count == 1):
            continue
        picks = np.stack(picks)  # [labels, keep], candidate indices within each label
        rows = (np.arange(n_labels)[:, None] * count + picks).ravel()
        state, images = gather(state, rows, guided), images[jnp.asarray(rows)]
        history = [h[np.arange(n_labels)[:, None], picks] for h in history]
        rows_labels, count = np.repeat(labels, keep), keep
    stats = {"token_passes_per_image": tokens / n_labels,
             "vae_decodes_per_image": decodes / n_labels,
             "reward": float(np.mean(history[-1])) if history else float("nan")}
    return Samples(images, {"codes": state["codes"]}, {}), stats
