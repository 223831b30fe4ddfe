"""The input pipeline: the families' official views against direct PIL/NumPy statements of
the official transforms, folder datasets, grain-parallel batches, and the sharded, resumable
code caches (kill and resume, refusal of foreign caches, bounded memory)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE
from PIL import Image

from arjax import sharding
from arjax.data import Batches, cache
from arjax.data.cache import CacheError, CodeStore
from arjax.data.sources import ArraySource, DataConfig, DataError, FolderSource, open_source
from arjax.data.views import make_views

S = 32
IMAGE = np.random.default_rng(0).integers(0, 256, (94, 125, 3), dtype=np.uint8)  # 4:3


def adm_center_crop(img, size):  # guided-diffusion center_crop_arr, as written there
    pil = Image.fromarray(img)
    while min(*pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.array(pil)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


def torchvision_resize(img, short, resample):  # Resize(int) on PIL: long = int(short*l/s)
    h, w = img.shape[:2]
    return np.array(Image.fromarray(img).resize((int(short * w / h), short), resample))


def crop_offsets(base, view):
    """Every (top, left, flipped) at which `view` is a crop of `base`."""
    found = []
    for flip in (False, True):
        v = view[:, ::-1] if flip else view
        for t in range(base.shape[0] - S + 1):
            for left in range(base.shape[1] - S + 1):
                if np.array_equal(base[t:t + S, left:left + S], v):
                    found.append((t, left, flip))
    return found


def test_center_and_flip_views_are_the_official_center_crop():
    views = make_views(IMAGE, "center_flip", S, 1, np.random.default_rng(0))
    np.testing.assert_array_equal(views[0], adm_center_crop(IMAGE, S))
    np.testing.assert_array_equal(views[1], adm_center_crop(IMAGE, S)[:, ::-1])


def test_ten_crop_views_are_llamagens_two_ten_crops():
    views = make_views(IMAGE, "ten_crop", S, 1, np.random.default_rng(0))
    assert views.shape == (20, S, S, 3)
    for k, ratio in enumerate((1.1, 1.05)):
        base = adm_center_crop(IMAGE, int(S * ratio))
        h, w = base.shape[:2]
        for flip in (0, 1):
            img = base[:, ::-1] if flip else base
            top, left = int(round((h - S) / 2)), int(round((w - S) / 2))
            five = [img[:S, :S], img[:S, -S:], img[-S:, :S], img[-S:, -S:],
                    img[top:top + S, left:left + S]]
            for j, crop in enumerate(five):
                np.testing.assert_array_equal(views[10 * k + 5 * flip + j], crop)


@pytest.mark.parametrize("name,short,resample,flips", [
    ("var_crops", round(1.125 * S), Image.LANCZOS, False),
    ("flowar_crops", int(1.125 * S), Image.BILINEAR, True)])
def test_random_crop_views_are_crops_of_the_official_resize(name, short, resample, flips):
    views = make_views(IMAGE, name, S, 10, np.random.default_rng([0, 7]))
    base = torchvision_resize(IMAGE, short, resample)
    places = [crop_offsets(base, v) for v in views]
    assert all(places), "every view is a crop (or mirrored crop) of the official resize"
    assert len({p[0][:2] for p in places}) > 5  # random offsets, not one crop repeated
    assert {p[0][2] for p in places} == ({False, True} if flips else {False})
    again = make_views(IMAGE, name, S, 10, np.random.default_rng([0, 7]))
    np.testing.assert_array_equal(views, again)  # stored crops: fixed per (seed, image)


def digits_like(n=40, size=16, views="center_flip"):
    rng = np.random.default_rng(1)
    return ArraySource(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                       np.arange(n) % 4, 4, views=views)


def test_batches_draw_one_view_per_global_row_on_any_mesh(devices):
    source = digits_like()
    one = sharding.make_mesh((("data", 1),), devices[:1])
    eight = sharding.make_mesh((("data", 8),), devices)
    a, b = Batches(source, 8, 3, one), Batches(source, 8, 3, eight, start_step=2)
    seen = [np.asarray(next(a)["image"]) for _ in range(4)]
    np.testing.assert_array_equal(np.asarray(next(b)["image"]), seen[2])
    idx, views = a.loader.indices(2), a.loader.views(2)
    assert set(views) == {0, 1}
    expected = np.stack([im[:, ::-1] if v else im for im, v in
                         zip(source.images[idx], views)])
    np.testing.assert_array_equal(seen[2], expected)
    a.close()
    b.close()


def test_grain_workers_load_the_same_batches(devices):
    mesh = sharding.make_mesh((("data", 2),), devices[:2])
    source = digits_like(views="var_crops")
    plain = Batches(source, 8, 5, mesh, start_step=3)
    parallel = Batches(source, 8, 5, mesh, start_step=3, workers=2, prefetch=2)
    for _ in range(4):
        x, y = next(plain), next(parallel)
        np.testing.assert_array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
        np.testing.assert_array_equal(np.asarray(x["label"]), np.asarray(y["label"]))
    assert y["image"].sharding == sharding.batch_sharding(mesh)
    plain.close()
    parallel.close()


def test_loader_errors_reach_the_training_thread(devices):
    class Broken(ArraySource):
        def get(self, indices, views):
            raise DataError("image 3 is unreadable")

    mesh = sharding.make_mesh((("data", 1),), devices[:1])
    batches = Batches(Broken(*(lambda s: (s.images, s.labels, 4))(digits_like())), 8, 0, mesh)
    with pytest.raises(DataError, match="unreadable"):
        next(batches)


def write_folder(root, sizes):
    for c, name in enumerate(("cat", "dog")):
        os.makedirs(root / name)
        for i, (w, h) in enumerate(sizes):
            img = np.full((h, w, 3), 40 * c + i, np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")


def test_folder_source_reads_classes_of_mixed_sizes(tmp_path):
    write_folder(tmp_path, [(40, 30), (30, 50), (64, 64)])
    source = open_source(DataConfig(name="folder", data_dir=str(tmp_path), image_size=S,
                                    views="center_flip"), "train")
    assert (source.num_examples, source.num_classes) == (6, 2) and source.num_views == 2
    rows = source.get(np.array([0, 4]), np.array([0, 1]))
    assert rows["image"].shape == (2, S, S, 3) and list(rows["label"]) == [0, 1]
    assert np.all(rows["image"][0] == 0) and np.all(rows["image"][1] == 41)


@pytest.mark.parametrize("setup,match", [
    (lambda root: None, "does not exist"),
    (lambda root: os.makedirs(root), "no class sub-folders"),
    (lambda root: os.makedirs(root / "cat"), "holds no images"),
    (lambda root: (os.makedirs(root / "cat"), (root / "cat" / "a.jpg").write_bytes(b"no")),
     "cannot read image"),
    (lambda root: write_folder(root, [(8, 8)]), "too small"),
])
def test_folder_source_bad_input_is_one_clear_error(tmp_path, setup, match):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=match):
        FolderSource(str(root), S).get(np.array([0]), np.array([0]))


def encode_mean(images):  # a stand-in tokenizer: per-row, per-view, deterministic
    return (images.astype(jnp.int32).reshape(images.shape[0], -1, 3).mean(1)
            .astype(jnp.int32))


def test_extracted_cache_holds_every_view_of_every_row(tmp_path):
    source = digits_like(n=10)
    mesh = sharding.make_mesh((("data", 1),), jax.devices()[:1])
    store = cache.extract(encode_mean, source, str(tmp_path / "c"), "fp", 4, mesh,
                          np.uint16, shard_rows=4, progress=False)
    assert sorted(f for f in os.listdir(tmp_path / "c") if "codes" in f) == [
        "shard-00000.codes.npy", "shard-00001.codes.npy", "shard-00002.codes.npy"]
    views = source.all_views(np.arange(10))["image"]
    expected = views.astype(np.int64).reshape(10, 2, -1, 3).mean(2).astype(np.int32)
    for v in (0, 1):
        rows = store.get(np.arange(10)[::-1], np.full(10, v))
        np.testing.assert_array_equal(rows["codes"], expected[::-1, v])
        np.testing.assert_array_equal(rows["label"], source.labels[::-1])
    assert store.get(np.arange(3), np.zeros(3, int))["codes"].dtype == np.int32
    assert np.load(tmp_path / "c" / "shard-00000.codes.npy").dtype == np.uint16


class Dying(ArraySource):
    """Rows fetched per extraction step are recorded; fetching row `dies_at` kills the run."""

    def __init__(self, base, dies_at=None):
        super().__init__(base.images, base.labels, 4, views=base.views)
        self.dies_at, self.fetched = dies_at, []

    def all_views(self, indices):
        if self.dies_at is not None and self.dies_at in indices:
            raise KeyboardInterrupt("killed")
        self.fetched.append(int(indices[0]))
        return super().all_views(indices)


def test_killed_extraction_resumes_to_the_same_bytes(tmp_path):
    base = digits_like(n=21)
    mesh = sharding.make_mesh((("data", 1),), jax.devices()[:1])
    extract = lambda source, name: cache.extract(encode_mean, source, str(tmp_path / name),
                                                 "fp", 4, mesh, shard_rows=8, progress=False)
    extract(base, "whole")
    with pytest.raises(KeyboardInterrupt):
        extract(Dying(base, dies_at=13), "cut")  # steps 0-2 written, step 3 killed
    with pytest.raises(CacheError, match="no manifest"):
        CodeStore(str(tmp_path / "cut"))
    again = Dying(base)
    extract(again, "cut")
    assert again.fetched == [12, 16, 20]  # resumed at step 3, not from the start
    names = sorted(f for f in os.listdir(tmp_path / "whole") if f.endswith(".npy"))
    assert names == sorted(f for f in os.listdir(tmp_path / "cut") if f.endswith(".npy"))
    for name in names:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes()


def test_foreign_or_damaged_caches_are_refused(tmp_path):
    source = digits_like(n=10)
    mesh = sharding.make_mesh((("data", 1),), jax.devices()[:1])
    path = str(tmp_path / "c")
    cache.extract(encode_mean, source, path, "tokenizer-a", 4, mesh, shard_rows=4,
                  progress=False)
    with pytest.raises(CacheError, match="another tokenizer"):
        cache.extract(encode_mean, source, path, "tokenizer-b", 4, mesh, progress=False)
    os.remove(os.path.join(path, "manifest.json"))  # now a partial extraction of tokenizer-a
    with pytest.raises(CacheError, match="partial extraction of something else"):
        cache.extract(encode_mean, source, path, "tokenizer-b", 4, mesh, progress=False)
    cache.extract(encode_mean, source, path, "tokenizer-a", 4, mesh, shard_rows=4,
                  progress=False)
    os.remove(os.path.join(path, "shard-00001.codes.npy"))
    with pytest.raises(CacheError, match="shard-00001.codes.npy"):
        CodeStore(path, "tokenizer-a")


RSS_SCRIPT = """
import resource, sys
import jax, jax.numpy as jnp, numpy as np
from arjax import sharding
from arjax.data import Batches, cache
from arjax.data.sources import ViewSource

class Synthetic(ViewSource):  # images made from their index: nothing held in memory
    def __init__(self, n):
        super().__init__(16)
        self.num_examples, self.num_classes = n, 10
    def decode(self, idx):
        return [np.full((16, 16, 3), i % 251, np.uint8) for i in idx], np.asarray(idx) % 10
    def all_views(self, idx):
        images, labels = self.decode(idx)
        return {"image": np.stack(images)[:, None], "label": labels.astype(np.int32)}

n = int(sys.argv[1])
mesh = sharding.make_mesh((("data", -1),))
encode = lambda x: jnp.broadcast_to(x[:, 0, 0, :1].astype(jnp.float32), (x.shape[0], 512))
store = cache.extract(encode, Synthetic(n), sys.argv[2], "fp", 500, mesh, progress=False)
batches = Batches(store, 250, 0, mesh)
for _ in range(n // 250):  # one epoch streamed through the loader
    jax.block_until_ready(next(batches))
batches.close()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.slow
def test_extraction_and_streaming_memory_does_not_grow_with_the_split(tmp_path):
    peak = {}
    for n in (2_000, 20_000):  # 2 KiB per row: 4 MB vs 40 MB if held in memory
        env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}  # one device
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(n), str(tmp_path / str(n))],
                             capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        peak[n] = int(out.stdout.split()[-1])
    assert peak[20_000] - peak[2_000] < 12, peak  # MiB
