"""Deterministic, resumable global batches.

The batch at step s is a pure function of (seed, s): epoch e = s // steps_per_epoch is a fresh
permutation drawn from `np.random.default_rng([seed, e])`. Resuming at step s therefore yields
exactly the batches an uninterrupted run would have seen, with no iterator state to checkpoint.
Each process loads only its own rows; `to_global` assembles the sharded jax.Array.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from arjax import sharding
from arjax.config import check
from arjax.data.sources import ImageSource


class Batches:
    def __init__(self, source: ImageSource, global_batch: int, seed: int, mesh: Mesh,
                 start_step: int = 0):
        sharding.check_batch(global_batch, mesh)
        check(global_batch <= source.num_examples,
              f"batch_size={global_batch} exceeds the {source.num_examples} examples of the data")
        self.source, self.global_batch, self.seed, self.mesh = source, global_batch, seed, mesh
        self.steps_per_epoch = source.num_examples // global_batch
        self.step = start_step
        n_proc = jax.process_count()
        self.local_batch = global_batch // n_proc
        self.local_rows = slice(jax.process_index() * self.local_batch,
                                (jax.process_index() + 1) * self.local_batch)

    def indices(self, step: int) -> np.ndarray:
        """Global example indices of the batch at `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.source.num_examples)
        return perm[within * self.global_batch:(within + 1) * self.global_batch]

    def local(self, step: int) -> dict[str, np.ndarray]:
        return self.source[np.sort(self.indices(step)[self.local_rows])]

    def __iter__(self):
        return self

    def __next__(self):
        batch = sharding.to_global(self.local(self.step), self.mesh)
        self.step += 1
        return batch
