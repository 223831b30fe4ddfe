"""Metrics to TensorBoard event files, a metrics.jsonl file and the console."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self._tb = SummaryWriter(logdir)
        self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        values = {k: float(np.asarray(v)) for k, v in metrics.items()}
        for name, value in values.items():
            self._tb.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        self._tb.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        self._tb.close()
        self._jsonl.close()
