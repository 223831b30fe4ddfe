"""DD1 training: (noise, flow-mapped tokens) pairs and the student's loss.

Pairs are generated once by the teacher's flow map (`generate`): example i has label
i mod num_classes and noise N(0, I) from fold_in(noise_key, i), so the data set stores only
token ids (a code cache: sharded, streamed, resumable, `arjax.data.cache`) and the noise is
regenerated inside the train step from the example's index (`PairSource` adds it to every
batch). No real image is used.

The loss (DD1's training appendix is not public; the released code fixes the architecture and
the inference split, not the objective, so this is our choice and documented as such): for
each example a trajectory point k is drawn from `timesteps` (DD1: {0, t2}); on the noise
positions of X_k, cross-entropy of the logits head against the flow map's token plus
`cont_weight` x the squared error of the continuous head against its code vector. Both heads
train on every noise position, so the split can be chosen at sampling time, as released.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from arjax.distill.flow import FlowDraw, gaussian_noise


class IdSource:
    """`n` examples whose "image" is the example index (what pair generation encodes)."""

    num_views, image_shape, image_dtype = 1, (), np.int32

    def __init__(self, n: int, num_classes: int):
        self.num_examples, self.num_classes = n, num_classes

    def all_views(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices)
        return {"image": indices.astype(np.int32)[:, None],
                "label": (indices % self.num_classes).astype(np.int32)}

    def get(self, indices, views) -> dict[str, np.ndarray]:
        """As a training source (`Batches`): labels only (DD2's generator needs no data)."""
        return self.all_views(indices)


class PairSource:
    """A pair cache (`CodeStore`) whose batches also carry each example's index."""

    def __init__(self, store):
        self.store, self.num_examples = store, store.num_examples
        self.num_classes, self.num_views = store.num_classes, 1

    def get(self, indices, views) -> dict[str, np.ndarray]:
        return {**self.store.get(indices, views), "index": np.asarray(indices, np.int32)}

    def __getitem__(self, indices):
        return self.get(indices, np.zeros(len(indices), np.int64))


def pair_encoder(sample_fn, noise_key: jax.Array, num_classes: int, length: int, dim: int,
                 codebook: jax.Array, grid: jax.Array):
    """ids int32 [n] -> flow-mapped tokens [n, L]: `sample_fn(labels, flow)` is the teacher's
    sampler with its weights bound (`raster.sample` or `var.sample`)."""
    def encode(ids):
        noise = gaussian_noise(noise_key, ids, length, dim)
        return sample_fn(ids % num_classes, FlowDraw(noise, codebook, grid))
    return encode


def dd1_loss(student, batch, key, codebook, *, noise_key: jax.Array,
             timesteps: tuple[int, ...], cont_weight: float):
    """The student's loss on a batch {"codes" [B, L], "label" [B], "index" [B]}."""
    tokens, labels = batch["codes"], batch["label"]
    b, length = tokens.shape
    noise = gaussian_noise(noise_key, batch["index"], length, codebook.shape[-1])
    k = jnp.asarray(timesteps, jnp.int32)[jax.random.randint(key, (b,), 0, len(timesteps))]
    starts = jnp.asarray(student.unit_starts - 1)
    predict = jnp.arange(length)[None] >= starts[k][:, None]  # the noise positions
    target = codebook[tokens]
    cont, logits = student(jnp.where(predict[..., None], noise, target), labels, k)
    weight = predict / jnp.maximum(predict.sum(), 1)
    ce = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, tokens) * weight)
    mse = jnp.sum(jnp.sum((cont - target) ** 2, -1) * weight)
    accuracy = jnp.sum((jnp.argmax(logits, -1) == tokens) * weight)
    return ce + cont_weight * mse, {"ce": ce, "mse": mse, "accuracy": accuracy}
