"""Image sources: the embedded scikit-learn digits and any TFDS image dataset (imagenet2012).

A source is random access: `source[indices] -> {"image": uint8 [n,H,W,3], "label": int32 [n]}`.
Random access (not a stream) is what makes batches a pure function of (seed, step), so training
resumes with exactly the same data order.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Protocol

import numpy as np
from PIL import Image

from arjax.config import check
from arjax.errors import UserError

DIGITS_TEST_SIZE = 297  # 1797 = 1500 train + 297 test, stratified, fixed seed


class DataError(UserError, RuntimeError):
    """The dataset is missing or malformed; the message says how to prepare it."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # "digits", "imagenet2012", or any TFDS image dataset name
    image_size: int = 32
    data_dir: str | None = None  # TFDS data dir (prepared datasets)
    manual_dir: str | None = None  # downloaded archives, for datasets TFDS cannot fetch


class ImageSource(Protocol):
    num_examples: int
    num_classes: int
    image_shape: tuple[int, int, int]

    def __getitem__(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


class ArraySource:
    """An in-memory source (digits, or any arrays a test builds)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int):
        self.images, self.labels = images, labels.astype(np.int32)
        self.num_examples = len(images)
        self.num_classes = num_classes
        self.image_shape = tuple(images.shape[1:])

    def __getitem__(self, indices):
        return {"image": self.images[indices], "label": self.labels[indices]}


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


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """ADM/LlamaGen center crop: box-downsample by 2 while possible, bicubic, then crop."""
    pil = Image.fromarray(image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil.convert("RGB"))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


IMAGENET_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


class TFDSSource:
    """Random access to a prepared TFDS image dataset (array_record), center-cropped."""

    def __init__(self, cfg: DataConfig, split: str):
        import tensorflow_datasets as tfds

        builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
        if not os.path.exists(os.path.join(str(builder.data_path), "dataset_info.json")):
            self._prepare(builder, cfg)
        check(split in builder.info.splits,
              f"{cfg.name} has splits {list(builder.info.splits)}, not {split!r}")
        self._source = builder.as_data_source(split=split)
        self.size = cfg.image_size
        self.num_examples = len(self._source)
        self.num_classes = builder.info.features["label"].num_classes
        self.image_shape = (cfg.image_size, cfg.image_size, 3)

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

    def __getitem__(self, indices):
        rows = self._source.__getitems__([int(i) for i in indices])
        images = np.stack([center_crop(r["image"], self.size) for r in rows])
        return {"image": images, "label": np.array([r["label"] for r in rows], np.int32)}


def open_source(cfg: DataConfig, split: str) -> ImageSource:
    """The one entry point experiments use: digits in memory, anything else through TFDS."""
    if cfg.name == "digits":
        return digits(split, cfg.image_size)
    return TFDSSource(cfg, split)
