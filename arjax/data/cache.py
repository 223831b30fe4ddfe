"""Sharded, streamed, resumable caches of a split's codes (VQ indices) or latents (KL moments).

Layout of a cache directory:

    extraction.json          what is being extracted (fingerprint, shapes, shard plan), first
    shard-00003.codes.npy    [rows, V, *item] codes of rows [3 S, 4 S) (S = shard_rows)
    shard-00003.label.npy    [rows] int32
    progress/process-1-of-2.json   the last extraction step process 1 has fully written
    manifest.json            written last, by process 0: the cache is complete

Why `.npy` shards: every process writes only its own files (no coordination, no
read-modify-write of shared chunks), rows are fixed-size so a row is one `pread` at a known
offset (no index, no decode), and the OS page cache, not Python, holds the hot set: memory
stays bounded whatever the split's size. Shard k belongs to process k mod P, so a cache read
with any process count is just another row -> file lookup. (array_record would add a
dependency and a parse per row for fixed-size rows; tensorstore/zarr is the upgrade for
object stores, not needed on a POSIX mount.)

Extraction is collective: at step t every process encodes its next `LB` rows (all V views) in
one jitted call over the mesh and writes its own output rows. Writes are idempotent, so after
a kill every process restarts from the smallest step all of them completed and the cache ends
byte-identical to an uninterrupted run's. A cache whose fingerprint (tokenizer parameters,
tokenizer/data config, split, views) differs from the expected one is refused.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from tqdm.auto import tqdm

from arjax import distributed, sharding
from arjax.data.batches import local_rows
from arjax.errors import UserError

FORMAT = 1
SHARD_ROWS = 4096


class CacheError(UserError, RuntimeError):
    """A cache that cannot be used as it is; the message says what to do."""


def _write_json(path: str, data: dict) -> None:
    with open(f"{path}.partial", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(f"{path}.partial", path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def shard_file(path: str, shard: int, kind: str) -> str:
    """`<path>/shard-<k>.<kind>.npy`, kind "codes" or "label"."""
    return os.path.join(path, f"shard-{shard:05d}.{kind}.npy")


class CodeStore:
    """Random-access reader of a complete cache: `get(indices, views)` reads only the
    requested view of the requested rows (`pread` of whole rows, no memory map kept)."""

    def __init__(self, path: str, fingerprint: str | None = None):
        manifest = _read_json(os.path.join(path, "manifest.json"))
        if manifest is None:
            raise CacheError(f"{path!r} is not a complete code cache (no manifest.json); "
                             "rerun the extraction, which resumes where it stopped")
        if fingerprint is not None and manifest["fingerprint"] != fingerprint:
            raise CacheError(
                f"code cache {path!r} was extracted by another tokenizer or data config "
                f"(fingerprint {manifest['fingerprint']}, expected {fingerprint}); delete it "
                "or point the run at a cache of this tokenizer")
        self.path, self.manifest = path, manifest
        self.num_examples, self.num_classes = manifest["num_examples"], manifest["num_classes"]
        self.num_views, self.shard_rows = manifest["views"], manifest["shard_rows"]
        self.item_shape = tuple(manifest["item_shape"])
        self.dtype = np.dtype(manifest["dtype"])
        self.num_shards = -(-self.num_examples // self.shard_rows)
        for k in range(self.num_shards):
            rows = min(self.shard_rows, self.num_examples - k * self.shard_rows)
            codes = self._file(k, "codes")
            expected = (rows, self.num_views, *self.item_shape)
            try:
                shape = np.load(codes, mmap_mode="r").shape
            except (OSError, ValueError):
                shape = None
            if shape != expected:
                raise CacheError(f"code cache {path!r}: shard {codes!r} is missing or has "
                                 f"shape {shape}, not {expected}; delete the cache and extract "
                                 "it again")
        self._offsets: dict[int, int] = {}
        self._labels: np.ndarray | None = None

    def _file(self, shard: int, kind: str) -> str:
        return shard_file(self.path, shard, kind)

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = np.concatenate([np.load(self._file(k, "label"))
                                           for k in range(self.num_shards)])
        return self._labels

    def _offset(self, shard: int) -> int:
        if shard not in self._offsets:
            self._offsets[shard] = np.load(self._file(shard, "codes"), mmap_mode="r").offset
        return self._offsets[shard]

    def get(self, indices, views) -> dict[str, np.ndarray]:
        indices, views = np.asarray(indices), np.asarray(views)
        item = int(np.prod(self.item_shape)) * self.dtype.itemsize
        out = np.empty((len(indices), *self.item_shape), self.dtype)
        order = np.argsort(indices, kind="stable")  # sequential reads, one open per shard
        shards = indices[order] // self.shard_rows
        for shard in np.unique(shards):
            with open(self._file(int(shard), "codes"), "rb") as f:
                base = self._offset(int(shard))
                for k in order[shards == shard]:
                    row = indices[k] - shard * self.shard_rows
                    f.seek(base + (row * self.num_views + views[k]) * item)
                    out[k] = np.frombuffer(f.read(item), self.dtype).reshape(self.item_shape)
        if np.issubdtype(self.dtype, np.integer):
            out = out.astype(np.int32)  # token ids as the models take them
        return {"codes": out, "label": self.labels[indices]}

    def __getitem__(self, indices):
        return self.get(indices, np.zeros(len(indices), np.int64))

    def __getstate__(self):  # grain workers get the path and reopen lazily
        return {**self.__dict__, "_offsets": {}, "_labels": None}


def shard_plan(num_examples: int, shard_rows: int, process: int, processes: int
               ) -> list[tuple[int, int, int]]:
    """(shard, first row, end row) of the shards `process` writes: shard k -> process k % P."""
    shards = -(-num_examples // shard_rows)
    return [(k, k * shard_rows, min((k + 1) * shard_rows, num_examples))
            for k in range(process, shards, processes)]


def extract(encode, source, path: str, fingerprint: str, batch: int, mesh,
            dtype=None, shard_rows: int = SHARD_ROWS, progress: bool = True) -> CodeStore:
    """Encodes every view of every row of `source` into the cache at `path` (or returns the
    complete cache there), resuming a partial extraction.

    `encode(images uint8 [n, S, S, 3] as a batch-sharded jax.Array) -> [n, *item]` is jitted
    (a source may declare other `image_shape` / `image_dtype`: DD's pairs encode indices)
    by the caller; `batch` is the global number of rows per step (each row brings its V views).
    `dtype` of the stored items: uint16 for codes of a vocabulary up to 65,536 (half the
    int32 bytes), float32 for moments; default: what `encode` returns.
    """
    if os.path.exists(os.path.join(path, "manifest.json")):
        return CodeStore(path, fingerprint)
    views = source.num_views
    batch_sharding = sharding.batch_sharding(mesh)
    dp = sharding.data_parallel_size(mesh)
    rows_per_step = max(dp, batch // dp * dp)
    local_batch = len(local_rows(batch_sharding, rows_per_step))
    proc, procs = jax.process_index(), jax.process_count()
    plan = shard_plan(source.num_examples, shard_rows, proc, procs)
    my_rows = np.concatenate([np.arange(a, b) for _, a, b in plan] or [np.zeros(0, int)])
    most = max(sum(b - a for _, a, b in shard_plan(source.num_examples, shard_rows, p, procs))
               for p in range(procs))
    steps = -(-most // local_batch)

    example = jax.eval_shape(encode, jax.ShapeDtypeStruct(
        (rows_per_step * views, *source.image_shape), getattr(source, "image_dtype", np.uint8),
        sharding=batch_sharding))
    item_shape, dtype = tuple(example.shape[1:]), np.dtype(dtype or example.dtype)
    meta = {"format": FORMAT, "fingerprint": fingerprint, "num_examples": source.num_examples,
            "num_classes": source.num_classes, "views": views, "item_shape": list(item_shape),
            "dtype": dtype.str, "shard_rows": shard_rows}
    begun = _read_json(os.path.join(path, "extraction.json"))
    if begun is not None and begun != meta:
        raise CacheError(
            f"{path!r} holds a partial extraction of something else (fingerprint "
            f"{begun.get('fingerprint')}, expected {fingerprint}); delete the directory or use "
            "another cache path")
    distributed.barrier("arjax-cache-checked")
    if distributed.is_main():
        os.makedirs(os.path.join(path, "progress"), exist_ok=True)
        _write_json(os.path.join(path, "extraction.json"), meta)
    distributed.barrier("arjax-cache-created")

    marker = os.path.join(path, "progress", f"process-{proc}-of-{procs}.json")
    done = (_read_json(marker) or {}).get("step", -1)
    start = distributed.min_over_processes(done) + 1
    for shard, a, b in plan:  # create this process's shards (kept when resuming)
        if start == 0 or not os.path.exists(shard_file(path, shard, "codes")):
            np.lib.format.open_memmap(shard_file(path, shard, "codes"), "w+", dtype,
                                      (b - a, views, *item_shape)).flush()
            np.lib.format.open_memmap(shard_file(path, shard, "label"), "w+", np.int32,
                                      (b - a,)).flush()
    jitted = jax.jit(encode, out_shardings=batch_sharding)
    bar = tqdm(total=steps, initial=start, desc=f"extract {os.path.basename(path)}",
               disable=not progress or not distributed.is_main(), dynamic_ncols=True)
    for step in range(start, steps):
        rows = my_rows[step * local_batch:(step + 1) * local_batch]
        valid = len(rows)
        padded = np.concatenate([rows, np.full(local_batch - valid, rows[-1] if valid else 0)])
        data = source.all_views(padded)
        images = data["image"].reshape(-1, *source.image_shape)
        x = jax.make_array_from_process_local_data(batch_sharding, images)
        out = distributed.local_rows_of(jitted(x)).reshape(local_batch, views, *item_shape)
        if np.issubdtype(dtype, np.integer) and valid:
            info = np.iinfo(dtype)
            if out.min() < info.min or out.max() > info.max:
                raise CacheError(f"codes out of the range of {dtype} ({out.min()}..{out.max()})")
        _write_rows(path, plan, rows, out[:valid].astype(dtype), data["label"][:valid])
        _write_json(marker, {"step": step})
        bar.update(1)
    bar.close()
    distributed.barrier("arjax-cache-written")
    if distributed.is_main():
        _write_json(os.path.join(path, "manifest.json"), meta)
    distributed.barrier("arjax-cache-complete")
    return CodeStore(path, fingerprint)


def _write_rows(path: str, plan, rows: np.ndarray, codes: np.ndarray,
                labels: np.ndarray) -> None:
    """Writes each row's codes and label at its place in its shard through a short-lived
    memory map (flushed, then unmapped, so resident memory does not grow); no fsync: the
    progress marker is written after, and a torn row is rewritten on resume."""
    for shard, a, b in plan:
        sel = (rows >= a) & (rows < b)
        if not sel.any():
            continue
        for kind, values in (("codes", codes[sel]), ("label", labels[sel])):
            mm = np.load(shard_file(path, shard, kind), mmap_mode="r+")
            mm[rows[sel] - a] = values
            mm.flush()
            del mm
