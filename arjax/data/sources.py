"""Image sources: the embedded scikit-learn digits, any folder of class sub-folders and any
TFDS image dataset (imagenet2012).

A source is random access: `source.get(indices, views) -> {"image": uint8 [n,S,S,3], "label":
int32 [n]}` (`source[indices]` = view 0). Random access (not a stream) is what makes batches a
pure function of (seed, step), so training resumes with exactly the same data order, and what
lets grain workers load any step in parallel.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Protocol

import numpy as np
from PIL import Image

from arjax.config import check
from arjax.data.views import make_views, num_views
from arjax.errors import UserError

DIGITS_TEST_SIZE = 297  # 1797 = 1500 train + 297 test, stratified, fixed seed


class DataError(UserError, RuntimeError):
    """The dataset is missing or malformed; the message says how to prepare it."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # "digits", "imagenet2012", any TFDS image dataset, or "folder"
    image_size: int = 32
    data_dir: str | None = None  # TFDS data dir (prepared datasets); "folder": the root
    manual_dir: str | None = None  # downloaded archives, for datasets TFDS cannot fetch
    views: str = "center"  # training views per image (arjax.data.views: the family's recipe)
    crops: int = 10  # stored random crops per image for views var_crops / flowar_crops
    crop_seed: int = 0  # seeds the stored random crops (per image)
    workers: int = 0  # input worker processes (grain); 0 = a background thread
    prefetch: int = 2  # batches ready ahead of the train step

    def validate(self) -> None:
        num_views(self.views, self.crops)
        check(self.image_size >= 8, f"data.image_size must be >= 8, got {self.image_size}")
        check(self.workers >= 0 and self.prefetch >= 1,
              f"data.workers must be >= 0 and data.prefetch >= 1, got {self.workers}, "
              f"{self.prefetch}")
        check(self.name != "folder" or bool(self.data_dir),
              "data.name=folder needs data.data_dir=/path/to/root (one sub-folder per class)")

    def content(self) -> dict:
        """The fields that decide what the data is (for cache fingerprints), not how fast it
        loads (workers, prefetch)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("workers", "prefetch")}


class ImageSource(Protocol):
    """Random access to a split: row i has `num_views` views (uint8 `image_shape`) and a
    label; `get(indices, views)` returns view `views[k]` of row `indices[k]`."""
    num_examples: int
    num_classes: int
    num_views: int
    image_shape: tuple[int, int, int]

    def get(self, indices: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]: ...


class ViewSource:
    """Decoded images of any size -> the views of `DataConfig.views` at `image_size` (the
    random crops seeded by (crop_seed, row), so a row's K views never change). Subclasses
    implement `decode(indices) -> (list of uint8 HxWx3, int labels)`."""

    num_examples: int
    num_classes: int

    def __init__(self, size: int, views: str = "center", crops: int = 1, crop_seed: int = 0):
        self.size, self.views, self.crops, self.crop_seed = size, views, crops, crop_seed
        self.num_views = num_views(views, crops)
        self.image_shape = (size, size, 3)

    def decode(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        raise NotImplementedError

    def all_views(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Every view of each row: {"image": uint8 [n, V, S, S, 3], "label": int32 [n]}."""
        images, labels = self.decode(np.asarray(indices))
        out = [make_views(im, self.views, self.size, self.crops,
                          np.random.default_rng([self.crop_seed, int(i)]))
               for im, i in zip(images, indices)]
        return {"image": np.stack(out), "label": np.asarray(labels, np.int32)}

    def get(self, indices, views):
        rows = self.all_views(indices)
        pick = np.asarray(views)
        return {"image": rows["image"][np.arange(len(pick)), pick], "label": rows["label"]}

    def __getitem__(self, indices):
        return self.get(indices, np.zeros(len(indices), np.int64))


class ArraySource(ViewSource):
    """An in-memory source (digits, or any arrays a test builds); images already at their
    size are their own centre crop (no resampling)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int,
                 views: str = "center", crops: int = 1, crop_seed: int = 0):
        super().__init__(images.shape[1], views, crops, crop_seed)
        self.images, self.labels = images, labels.astype(np.int32)
        self.num_examples = len(images)
        self.num_classes = num_classes
        self.image_shape = tuple(images.shape[1:])

    def decode(self, indices):
        return list(self.images[indices]), self.labels[indices]

    def all_views(self, indices):
        if self.views == "center":  # already at its size: its own centre crop
            return {"image": self.images[indices][:, None], "label": self.labels[indices]}
        return super().all_views(indices)


@functools.lru_cache(maxsize=8)
def digits(split: str = "train", image_size: int = 32) -> ArraySource:
    """scikit-learn's 1,797 handwritten digits, upsampled (bicubic) to RGB `image_size`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check(split in ("train", "test"), f"digits has splits 'train' and 'test', not {split!r}")
    check(image_size >= 8, f"digits image_size must be >= 8, got {image_size}")
    data = load_digits()
    grey = np.round(data.images * (255 / 16)).astype(np.uint8)
    idx_train, idx_test = train_test_split(np.arange(len(grey)), test_size=DIGITS_TEST_SIZE,
                                           stratify=data.target, random_state=0)
    idx = np.sort(idx_train if split == "train" else idx_test)
    up = np.stack([np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.BICUBIC))
                   for g in grey[idx]])
    return ArraySource(np.repeat(up[..., None], 3, axis=-1), data.target[idx], num_classes=10)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class FolderSource(ViewSource):
    """Any folder of images with one sub-folder per class (torchvision's ImageFolder layout:
    classes sorted by folder name, files sorted within each); decoded with PIL as RGB."""

    def __init__(self, root: str, size: int, views: str = "center", crops: int = 1,
                 crop_seed: int = 0):
        super().__init__(size, views, crops, crop_seed)
        if not os.path.isdir(root):
            raise DataError(f"image folder {root!r} does not exist; pass data.data_dir=<root> "
                            "with one sub-folder of images per class")
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.files, labels = [], []
        for label, name in enumerate(classes):
            folder = os.path.join(root, name)
            found = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise DataError(f"class folder {folder!r} holds no images ({IMAGE_EXTENSIONS}); "
                                "remove it or add its images")
            self.files += [os.path.join(folder, f) for f in found]
            labels += [label] * len(found)
        if not classes:
            raise DataError(f"image folder {root!r} has no class sub-folders; put the images "
                            "of each class in <root>/<class name>/")
        self.labels = np.asarray(labels, np.int32)
        self.classes = classes
        self.num_examples, self.num_classes = len(self.files), len(classes)

    def decode(self, indices):
        images = []
        for i in indices:
            try:
                with Image.open(self.files[i]) as im:
                    images.append(np.asarray(im.convert("RGB")))
            except OSError as e:
                raise DataError(f"cannot read image {self.files[i]!r} ({e}); delete or "
                                "replace it") from None
            h, w = images[-1].shape[:2]
            if min(h, w) < self.size // 2:
                raise DataError(f"image {self.files[i]!r} is {w}x{h}, too small for "
                                f"image_size={self.size}; remove it or lower data.image_size")
        return images, self.labels[np.asarray(indices)]


IMAGENET_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


class TFDSSource(ViewSource):
    """Random access to a prepared TFDS image dataset (array_record)."""

    def __init__(self, cfg: DataConfig, split: str, views: str = "center"):
        import tensorflow_datasets as tfds

        super().__init__(cfg.image_size, views, cfg.crops, cfg.crop_seed)
        builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
        if not os.path.exists(os.path.join(str(builder.data_path), "dataset_info.json")):
            self._prepare(builder, cfg)
        check(split in builder.info.splits,
              f"{cfg.name} has splits {list(builder.info.splits)}, not {split!r}")
        self._location = (str(builder.data_path), split)
        self._source = builder.as_data_source(split=split)
        self.num_examples = len(self._source)
        self.num_classes = builder.info.features["label"].num_classes

    def __getstate__(self):  # grain workers reopen the prepared files, not the builder class
        return {**self.__dict__, "_source": None}

    def __setstate__(self, state):
        import tensorflow_datasets as tfds

        self.__dict__.update(state)
        path, split = self._location
        self._source = tfds.builder_from_directory(path).as_data_source(split=split)

    @staticmethod
    def _prepare(builder, cfg: DataConfig) -> None:
        import tensorflow_datasets as tfds

        if cfg.name == "imagenet2012":
            missing = [a for a in IMAGENET_ARCHIVES
                       if not cfg.manual_dir or not os.path.exists(os.path.join(cfg.manual_dir, a))]
            if missing:
                raise DataError(
                    f"imagenet2012 is not prepared in data_dir={cfg.data_dir!r} and the manual "
                    f"download dir {cfg.manual_dir!r} lacks {missing}. Download them from "
                    "https://image-net.org, put them in one folder and pass "
                    "--set data.manual_dir=/that/folder --set data.data_dir=/where/to/prepare; "
                    "preparation runs once (needs `pip install arjax[imagenet]`).")
        try:
            builder.download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(manual_dir=cfg.manual_dir))
        except Exception as e:  # TFDS raises many types; give one actionable message
            raise DataError(f"could not prepare TFDS dataset {cfg.name!r} in {cfg.data_dir!r}: "
                            f"{e}. Check data_dir/manual_dir.") from e

    def decode(self, indices):
        rows = self._source.__getitems__([int(i) for i in indices])
        return [r["image"] for r in rows], np.array([r["label"] for r in rows], np.int32)


def open_source(cfg: DataConfig, split: str) -> ImageSource:
    """The one entry point experiments use: digits in memory, "folder" (data_dir/<class>/),
    anything else through TFDS. The training split has the views of `cfg.views`; every other
    split the centre crop (the official evaluation transform)."""
    cfg.validate()
    views = cfg.views if split == "train" else "center"
    if cfg.name == "digits":
        base = digits(split, cfg.image_size)
        if views == "center":
            return base
        return ArraySource(base.images, base.labels, base.num_classes, views, cfg.crops,
                           cfg.crop_seed)
    if cfg.name == "folder":
        root = os.path.join(cfg.data_dir, split)
        return FolderSource(root if os.path.isdir(root) else cfg.data_dir, cfg.image_size,
                            views, cfg.crops, cfg.crop_seed)
    return TFDSSource(cfg, split, views)
