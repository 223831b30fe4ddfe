"""The digits-domain evaluator: a small CNN classifier trained by the project on the digits train
split, used as the feature network for FID-digits, IS-digits and class accuracy.

Training is deterministic (fixed seed, fixed batches) and takes well under a minute on a CPU;
the weights are cached in `$ARJAX_CACHE` (default ~/.cache/arjax) keyed by a version string,
so every experiment and benchmark scores samples with the same network.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from arjax.data.sources import digits
from arjax.images import to_float
from arjax.models import bind, split
from arjax.sharding import path_str

VERSION = "digits_cnn_v1"
TRAIN_STEPS = 400
FEATURE_DIM = 128


class DigitsCNN(nnx.Module):
    """32x32x3 in [-1, 1] -> (features [B,128], logits [B,10])."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 64, (3, 3), rngs=rngs)
        self.conv3 = nnx.Conv(64, 64, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(64 * 4 * 4, FEATURE_DIM, rngs=rngs)
        self.head = nnx.Linear(FEATURE_DIM, 10, rngs=rngs)

    def spatial(self, x: jax.Array) -> jax.Array:
        """The last conv feature map, [B, 4, 4, 64]: what a layout (structure) looks like."""
        pool = lambda h: nnx.avg_pool(h, (2, 2), strides=(2, 2))
        h = pool(jax.nn.relu(self.conv1(x)))
        h = pool(jax.nn.relu(self.conv2(h)))
        return pool(jax.nn.relu(self.conv3(h)))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = self.spatial(x)
        features = jax.nn.relu(self.fc(h.reshape(h.shape[0], -1)))
        return features, self.head(features)


def _to_input(images) -> jax.Array:
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        images = to_float(images)
    if images.shape[1:3] != (32, 32):
        images = jax.image.resize(images, (images.shape[0], 32, 32, images.shape[3]), "linear")
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    return images


def _train(seed: int = 0):
    graphdef, params = split(DigitsCNN(rngs=nnx.Rngs(seed)))
    tx = optax.adam(1e-3)
    opt = tx.init(params)
    source = digits("train", 32)
    x_all, y_all = _to_input(source.images), jnp.asarray(source.labels)

    @jax.jit
    def step(params, opt, key):
        k_idx, k_shift = jax.random.split(key)
        idx = jax.random.choice(k_idx, len(y_all), (128,), replace=False)
        dx, dy = jax.random.randint(k_shift, (2,), -2, 3)
        x = jnp.roll(x_all[idx], (dx, dy), axis=(1, 2))  # small shifts: robustness to samples

        def loss(p):
            logits = bind(graphdef, p)(x)[1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y_all[idx]).mean()

        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    for i in range(TRAIN_STEPS):
        params, opt = step(params, opt, jax.random.fold_in(jax.random.key(seed), i))
    return graphdef, params


@dataclasses.dataclass
class DigitsEvaluator:
    """Scores images of digits: features for FID/PR, softmax for IS, labels for accuracy."""

    graphdef: nnx.GraphDef
    params: dict

    @classmethod
    def load(cls, cache_dir: str | None = None) -> DigitsEvaluator:
        cache_dir = cache_dir or os.environ.get("ARJAX_CACHE",
                                                os.path.expanduser("~/.cache/arjax"))
        path = os.path.join(cache_dir, f"{VERSION}.npz")
        graphdef, abstract = split(nnx.eval_shape(lambda: DigitsCNN(rngs=nnx.Rngs(0))))
        if os.path.exists(path):
            flat = dict(np.load(path))
            leaves, tree = jax.tree_util.tree_flatten_with_path(abstract)
            params = jax.tree.unflatten(tree, [jnp.asarray(flat[path_str(p)])
                                               for p, _ in leaves])
            return cls(graphdef, params)
        graphdef, params = _train()
        os.makedirs(cache_dir, exist_ok=True)
        flat = {path_str(p): np.asarray(x)
                for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        tmp = f"{path}.{os.getpid()}.tmp.npz"  # concurrent processes never share a temp file
        np.savez(tmp, **flat)
        os.replace(tmp, path)
        return cls(graphdef, params)

    def __post_init__(self):
        self._apply = jax.jit(lambda p, x: bind(self.graphdef, p)(_to_input(x)))
        self._spatial = jax.jit(lambda p, x: bind(self.graphdef, p).spatial(_to_input(x)))

    def spatial_features(self, images) -> np.ndarray:
        """images -> [N, 16, 64] feature-map patches (TTS-VAR's structure features)."""
        maps = np.asarray(self._spatial(self.params, np.asarray(images)))
        return maps.reshape(len(maps), -1, maps.shape[-1])

    def log_prob(self, images, labels) -> np.ndarray:
        """log p(label | image) under the classifier: a reward for search samplers."""
        _, probs = self.features_and_probs(images)
        return np.log(np.maximum(probs[np.arange(len(probs)), np.asarray(labels)], 1e-12))

    def features_and_probs(self, images, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """images uint8 [N,H,W,C] or floats in [-1,1] -> (features [N,128], probs [N,10])."""
        feats, probs = [], []
        for start in range(0, len(images), batch):
            f, logits = self._apply(self.params, np.asarray(images[start:start + batch]))
            feats.append(np.asarray(f))
            probs.append(np.asarray(jax.nn.softmax(logits)))
        return np.concatenate(feats), np.concatenate(probs)
