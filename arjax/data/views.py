"""The official ImageNet preprocessing of each family, as fixed sets of *views* per image.

A view set turns one decoded image (uint8 HxWx3, any size) into V crops of `size` x `size`:
deterministic crops (centre, ten-crop) are the official ones exactly; the random-crop recipes
(VAR, FlowAR), which the official code draws afresh every epoch while encoding online, become
K crops drawn once per image from a generator seeded by (seed, image index) and cached; a
training batch then draws one of the V views per row and step (`Batches`). That is the
documented alternative to online encoding: K=10 stored crops instead of one per epoch.

| name | V | official recipe |
|---|---|---|
| `center` | 1 | ADM centre crop (LlamaGen/MAR/ADM `center_crop_arr`) |
| `center_flip` | 2 | centre crop, and its mirror: LlamaGen's extract_codes_c2i, MAR's cache |
| `ten_crop` | 20 | LlamaGen `--ten-crop`: centre crop to int(1.1 S) then TenCrop(S), and at 1.05 |
| `var_crops` | K | VAR: Resize(round(1.125 S), LANCZOS) short side, RandomCrop(S), no flip |
| `flowar_crops` | K | FlowAR: Resize(int(1.125 S)) bilinear, RandomCrop(S), RandomHorizontalFlip |
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from arjax.config import check

VIEW_SETS = ("center", "center_flip", "ten_crop", "var_crops", "flowar_crops")
TEN_CROP_RANGES = (1.1, 1.05)  # LlamaGen's two extraction runs (dirs *_ten_crop, *_ten_crop_105)


def num_views(name: str, crops: int) -> int:
    check(name in VIEW_SETS, f"data.views must be one of {VIEW_SETS}, got {name!r}")
    check(crops >= 1, f"data.crops must be >= 1, got {crops}")
    return {"center": 1, "center_flip": 2, "ten_crop": 20}.get(name, crops)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """ADM/LlamaGen centre crop: box-downsample by 2 while possible, bicubic, then crop."""
    pil = Image.fromarray(image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil.convert("RGB"))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def resize_short(image: np.ndarray, short: int, resample) -> np.ndarray:
    """torchvision `Resize(short)` on a PIL image: the short side becomes `short`, the long side
    int(short * long / short_side) (truncated)."""
    h, w = image.shape[:2]
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    return np.asarray(Image.fromarray(image).resize(size, resample=resample))


def five_crop(image: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision `FiveCrop`: top-left, top-right, bottom-left, bottom-right, centre (centre
    offsets int(round((H - S) / 2)))."""
    h, w = image.shape[:2]
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    return [image[:size, :size], image[:size, w - size:], image[h - size:, :size],
            image[h - size:, w - size:], image[top:top + size, left:left + size]]


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """torchvision `RandomCrop(S)`: offsets uniform in [0, H - S] and [0, W - S]."""
    h, w = image.shape[:2]
    check(h >= size and w >= size, f"an image of {w}x{h} is smaller than the {size} px crop")
    top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    return image[top:top + size, left:left + size]


def make_views(image: np.ndarray, name: str, size: int, crops: int,
               rng: np.random.Generator) -> np.ndarray:
    """The V views (uint8 [V, size, size, 3]) of one RGB image under the view set `name`;
    `rng` (seeded per image) draws the random crops."""
    if name == "center":
        return center_crop(image, size)[None]
    if name == "center_flip":
        crop = center_crop(image, size)
        return np.stack([crop, crop[:, ::-1]])
    if name == "ten_crop":
        out = []
        for ratio in TEN_CROP_RANGES:
            base = center_crop(image, int(size * ratio))
            out += five_crop(base, size) + five_crop(np.ascontiguousarray(base[:, ::-1]), size)
        return np.stack(out)
    if name == "var_crops":
        base = resize_short(image, round(1.125 * size), Image.LANCZOS)
        return np.stack([random_crop(base, size, rng) for _ in range(crops)])
    if name == "flowar_crops":
        base = resize_short(image, int(1.125 * size), Image.BILINEAR)
        out = []
        for _ in range(crops):
            crop = random_crop(base, size, rng)
            out.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
        return np.stack(out)
    raise ValueError(name)
