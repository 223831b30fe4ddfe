"""Deterministic, resumable global batches, loaded in parallel ahead of the train step.

The batch at step s is a pure function of (seed, s): epoch e = s // steps_per_epoch is a fresh
permutation drawn from `np.random.default_rng([seed, e])`, and for sources with several views
per row (flips, crops: `arjax.data.views`) the view of each row of the *global* batch is drawn
from `default_rng([seed, s, 1])`. Resuming at step s therefore yields exactly the batches an
uninterrupted run would have seen, on any number of processes, with no iterator state to
checkpoint.

Each process loads only the rows of the global batch its devices hold (read from the batch
sharding, so it stays right for any mesh); a grain `MapDataset` over steps evaluates that in
`workers` processes (decode + crop off the training thread; 0 = in a background thread), and
a background thread turns each host batch into the sharded global `jax.Array`
(`make_array_from_process_local_data`, no cross-process traffic) `prefetch` batches ahead.
"""

from __future__ import annotations

import queue
import sys
import threading

import jax
import numpy as np
from jax.sharding import Mesh

from arjax import sharding
from arjax.config import check


def local_rows(batch_sharding, global_batch: int) -> np.ndarray:
    """Positions in the global batch this process's devices hold, in the order
    `make_array_from_process_local_data` expects them."""
    index = batch_sharding.addressable_devices_indices_map((global_batch,))
    starts = sorted({(s[0].start or 0, s[0].stop or global_batch) for s in index.values()})
    return np.concatenate([np.arange(a, b) for a, b in starts])


class StepLoader:
    """step -> this process's rows of the global batch (picklable: what grain workers run)."""

    def __init__(self, source, global_batch: int, seed: int, rows: np.ndarray):
        self.source, self.global_batch, self.seed, self.rows = source, global_batch, seed, rows
        self.steps_per_epoch = source.num_examples // global_batch

    def indices(self, step: int) -> np.ndarray:
        """Global example indices of the batch at `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.source.num_examples)
        return perm[within * self.global_batch:(within + 1) * self.global_batch]

    def views(self, step: int) -> np.ndarray:
        """The view (flip / crop) of each row of the global batch at `step`."""
        n = getattr(self.source, "num_views", 1)
        if n == 1:
            return np.zeros(self.global_batch, np.int64)
        return np.random.default_rng([self.seed, step, 1]).integers(0, n, self.global_batch)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        return self.source.get(self.indices(step)[self.rows], self.views(step)[self.rows])


def _mark_flags_parsed() -> None:
    """grain reads absl flags in its workers; arjax does not parse absl flags itself."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class Batches:
    """Iterator of global batches from `start_step` on; `close()` stops its workers."""

    def __init__(self, source, global_batch: int, seed: int, mesh: Mesh, start_step: int = 0,
                 workers: int = 0, prefetch: int = 2):
        sharding.check_batch(global_batch, mesh)
        check(global_batch <= source.num_examples,
              f"batch_size={global_batch} exceeds the {source.num_examples} examples of the data")
        self.step = start_step
        self._sharding = sharding.batch_sharding(mesh)
        self.loader = StepLoader(source, global_batch, seed,
                                 local_rows(self._sharding, global_batch))
        self.workers, self.prefetch = workers, prefetch
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    def indices(self, step: int) -> np.ndarray:
        return self.loader.indices(step)

    def local(self, step: int) -> dict[str, np.ndarray]:
        return self.loader(step)

    def _host_batches(self):
        import grain

        ds = (grain.MapDataset.range(self.step, sys.maxsize).map(self.loader)
              .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
        if self.workers:
            _mark_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.workers, per_worker_buffer_size=self.prefetch))
        return iter(ds)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                return self._queue.put(item, timeout=0.1)
            except queue.Full:
                continue

    def _fill(self) -> None:
        it = None
        try:
            it = self._host_batches()
            while not self._stop.is_set():
                self._put(jax.tree.map(
                    lambda x: jax.make_array_from_process_local_data(self._sharding, x),
                    next(it)))
        except BaseException as e:  # handed to the training thread, raised by __next__
            self._put(e)
        finally:
            if it is not None and hasattr(it, "close"):
                it.close()

    def __iter__(self):
        return self

    def __next__(self):
        if self._queue is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._fill, daemon=True,
                                            name="arjax-batches")
            self._thread.start()
        batch = self._queue.get()
        if isinstance(batch, BaseException):
            self.close()
            raise batch
        self.step += 1
        return batch

    def close(self) -> None:
        """Stops the loader thread and grain's worker processes."""
        if self._queue is not None:
            self._stop.set()
            self._thread.join(timeout=30)
            self._queue = None

    def __del__(self):
        if hasattr(self, "_stop"):
            self.close()
