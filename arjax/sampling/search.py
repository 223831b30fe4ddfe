"""Test-time search over the scales of a class-conditional scale-wise generator: TTS-VAR
(arXiv 2507.18537) for VAR, and the same search over FlowAR's scales (no published version).

Each label starts with C candidate paths; after every scale the number kept follows a
descending schedule (`batch_schedule`, the paper's `bs_sis`). A decrease happens only at a
*cluster* scale (coarse: structure features of the decoded candidates, k-means into the next
count, the member nearest each centroid is kept: diversity) or a *resample* scale (fine:
rewards -> potentials exp(lambda R), multinomial draw with replacement: quality). The final
image of each label is the candidate of highest reward. A family supplies `Candidates`
(start / step / gather / outputs): selection gathers its whole decoding state (KV caches of
both CFG halves, f_hat or the last level, next input, codes) with one pytree gather, and every
(scale, candidate count) has its own compiled step, so shapes stay static.

`features(images) -> [N, P, D]` (spatial features: the paper's DINOv2 patch tokens) and
`reward(images, labels) -> [N]` are plain host functions; `hook(name)` resolves the provided
ones (the digits classifier's, the project's Inception-v3 features) or `module:function`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from arjax import distributed, sharding
from arjax.config import ConfigError, check
from arjax.images import to_uint8
from arjax.sampling.generator import Generated, Samples

POTENTIALS = ("value", "diff", "max", "sum")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    enabled: bool = False  # experiments: sample (report, scores) with the search
    batch_schedule: tuple[int, ...] = (8, 8, 6, 6, 4, 2, 2, 1, 1, 1)  # kept after each scale
    cluster_scales: tuple[int, ...] = (2, 4)  # diversity (k-means on structure features)
    resample_scales: tuple[int, ...] = (5, 7)  # potentials exp(lambda R), with replacement
    potential: str = "value"  # value | diff (R_t - R_t-1) | max (over history) | sum
    lam: float = 10.0
    reward: str = ""  # a `hook` name or package.module:function (experiments)
    features: str = ""  # idem; used at cluster scales
    seed: int = 0  # of the resampling draws

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


def search(candidates, key: jax.Array, labels: np.ndarray, cfg: SearchConfig,
           reward: Callable, features: Callable | None = None, mesh=None
           ) -> tuple[Samples, dict]:
    """The search for each label over a scale-wise family's `candidates` (`sampling.var.
    Candidates` or `sampling.flowar.Candidates`: start / step / gather / outputs) -> (Samples
    of the chosen candidates, stats: every counted cost per final image, VAE decodes per final
    image, the final mean reward). With a `mesh`, the candidates are split over its
    data-parallel axes whenever their count divides evenly (replicated otherwise), the steps
    are traced under it (each block keeps its rows on their devices,
    `sharding.constrain_batch`), and every process runs the same host-side selection on the
    gathered images."""
    scales = candidates.scales
    cfg.validate(scales)
    check(not cfg.cluster_scales or features is not None,
          "search.cluster_scales need a features function")
    labels = np.asarray(labels, np.int32)
    put, whole = jnp.asarray, jnp.asarray  # candidate rows; row indices every device needs
    if mesh is not None:
        split = sharding.data_parallel_size(mesh)
        whole = lambda x: sharding.from_host(x, mesh, sharding.replicated(mesh))
        put = lambda x: (sharding.from_host(x, mesh) if len(x) % split == 0 else whole(x))
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        return _search(candidates, key, labels, cfg, reward, features, put, whole)


def _search(candidates, key, labels, cfg, reward, features, put, whole):
    scales, n_labels, count = candidates.scales, len(labels), cfg.batch_schedule[0]
    rows_labels = np.repeat(labels, count)
    rng = np.random.default_rng(cfg.seed)
    state = candidates.start(put(rows_labels))
    history: list[np.ndarray] = []  # rewards [labels, count] at each scored scale
    totals: dict[str, int] = {"vae_decodes": 0}
    for k in range(scales):
        select = k in cfg.cluster_scales or k in cfg.resample_scales or k == scales - 1
        state, images, cost = candidates.step(state, put(rows_labels), key, k, select)
        for name, value in {**cost, "vae_decodes": len(rows_labels) * select}.items():
            totals[name] = totals.get(name, 0) + int(value)
        keep, picks = cfg.batch_schedule[k], None
        host = distributed.gather(images) if select else None
        if k in cfg.cluster_scales:
            vectors = structure_vectors(features(host))
            picks = [cluster_select(v, keep) for v in vectors.reshape(n_labels, count, -1)]
        if k in cfg.resample_scales or k == scales - 1:
            r = np.asarray(reward(host, rows_labels), np.float64)
            history.append(r.reshape(n_labels, count))
            if k == scales - 1:
                keep, picks = 1, [np.array([np.argmax(h)]) for h in history[-1]]
            else:
                h = np.stack(history)
                picks = [resample(rng, potentials(h[:, i], cfg.potential, cfg.lam), keep)
                         for i in range(n_labels)]
        if picks is None or count == 1:
            continue
        picks = np.stack(picks)  # [labels, keep], candidate indices within each label
        rows = whole((np.arange(n_labels)[:, None] * count + picks).ravel())
        state, images = candidates.gather(state, rows), images[rows]
        history = [h[np.arange(n_labels)[:, None], picks] for h in history]
        rows_labels, count = np.repeat(labels, keep), keep
    stats = {f"{name}_per_image": value / n_labels for name, value in totals.items()}
    stats["reward"] = float(np.mean(history[-1]))
    return Samples(images, candidates.outputs(state), {}), stats


def hook(name: str) -> Callable:
    """A reward or features function by name: `digits_reward` (log p(label | image) under the
    digits classifier), `digits_features` (its 4x4 feature-map patches), `inception_features`
    (Inception-v3's mixed_6/conv map, 17x17 patches), or `package.module:function`."""
    if name in ("digits_reward", "digits_features"):
        from arjax.metrics.digits import DigitsEvaluator

        evaluator = DigitsEvaluator.load()
        return evaluator.log_prob if name == "digits_reward" else evaluator.spatial_features
    if name == "inception_features":
        from arjax.evaluate import inception_features

        return lambda images: inception_features(to_uint8(images), progress=False)[
            "spatial"].reshape(len(images), 17 * 17, -1)
    module, _, function = name.partition(":")
    check(bool(module and function), f"search hook {name!r}: use digits_reward, "
          "digits_features, inception_features or package.module:function")
    import importlib

    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"search hook {name!r} cannot be imported: {e}") from None


def make_generator(candidates_fn: Callable, cfg: SearchConfig, mesh
                   ) -> Callable[[object, np.ndarray, jax.Array], Generated]:
    """The experiments' `generate(params, labels, key) -> Generated` contract with the search
    in place of plain sampling: `candidates_fn(params)` builds the family's Candidates; the
    reward and features come from `cfg.reward` / `cfg.features` (`hook`); the stats are the
    search's counted costs per image and the wall-clock `seconds`."""
    check(bool(cfg.reward), "search.reward is empty: set a reward function, "
          "package.module:function taking (images [N,H,W,3] in [-1, 1], labels [N]) -> [N] "
          "(e.g. an ImageNet classifier's log-probability; no weights ship offline)")
    reward = hook(cfg.reward)
    features = hook(cfg.features) if cfg.cluster_scales else None

    def generate(params, labels: np.ndarray, key: jax.Array) -> Generated:
        t0 = time.perf_counter()
        out, stats = search(candidates_fn(params), key, labels, cfg, reward, features, mesh)
        images = to_uint8(distributed.gather(out.images))  # every process gets them all
        return Generated(images, {k: distributed.gather(v) for k, v in out.aux.items()},
                         {**stats, "seconds": time.perf_counter() - t0})

    return generate
