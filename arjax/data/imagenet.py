"""ImageNet-1k facts every ImageNet preset shares (one place, not one copy per experiment)."""

TRAIN_IMAGES = 1_281_167
NUM_CLASSES = 1000
IMAGE_SIZE = 256
# The classes of the papers' sample figures (macaw, otter, panda, volcano, ...): the PNG grid.
SHOWCASE_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)


def steps_for_epochs(epochs: float, batch_size: int) -> int:
    """Optimiser steps of `epochs` passes over the training set at `batch_size`."""
    return int(epochs * TRAIN_IMAGES // batch_size)
