"""The config fields every experiment repeats, as one base dataclass to extend."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from arjax.data import DataConfig
from arjax.data.imagenet import IMAGE_SIZE, SHOWCASE_CLASSES

DIGITS_DATA = DataConfig(name="digits", image_size=32)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Subclasses add their sections; `DERIVED` maps a field to the field it is copied from
    (`{"model.vocab_size": "tokenizer.codebook_size"}`): linked values live in one place, are
    filled in on every construction or override, and cannot be overridden themselves."""

    DERIVED: ClassVar[dict[str, str]] = {}

    data: DataConfig = DataConfig()
    samples_per_class: int = 8  # for the PNG grid
    eval_samples_per_class: int = 0  # digits: samples scored by the digits evaluator
    sample_classes: tuple[int, ...] = tuple(range(10))
    fid_samples_per_class: int = 0  # FID protocol (ImageNet: 50): every class, .npz for
    fid_batch: int = 250  # `arjax.evaluate`, sampled this many images at a time
    encode_batch: int = 256  # images per call when a split is tokenized once
    mesh: tuple[tuple[str, int], ...] = (("data", -1), ("fsdp", 1))
    param_sharding: str = "fsdp"  # weight layout on the mesh (arjax.sharding.RULE_SETS)
    seed: int = 0

    def __post_init__(self):
        for target, source in self.DERIVED.items():
            section, field = target.split(".")
            value, sub = self, getattr(self, section)
            for part in source.split("."):
                value = getattr(value, part)
            if sub is not None and getattr(sub, field) != value:
                object.__setattr__(self, section, dataclasses.replace(sub, **{field: value}))


def imagenet_setup(views: str) -> dict:
    """The data and sample fields of an ImageNet preset: imagenet2012 at 256 px with the
    family's official training views (`arjax.data.views`: flips, ten crops or 10 stored random
    crops per image), 16 input workers, and the papers' showcase classes for the grid."""
    return dict(data=DataConfig(name="imagenet2012", image_size=IMAGE_SIZE, views=views,
                                crops=10, workers=16),
                sample_classes=SHOWCASE_CLASSES)
