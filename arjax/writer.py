"""Metrics to TensorBoard event files, a metrics.jsonl file and the console.

A writer opened to resume at step s keeps the jsonl rows up to s and drops later ones (they
came from steps a crash lost), so metrics.jsonl never repeats a step; those rows are the
stage's earlier history. Only process 0 writes (`arjax.distributed.is_main`); the others read
the history and drop their scalars.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

import numpy as np


def _summary_writer(logdir: str):
    """tensorboardX's writer, imported on first use and without torch: tensorboardX imports
    torch when it is installed (7 s) although arjax only writes scalars and images."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # makes tensorboardX's optional `import torch` fail fast
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter(logdir)


class MetricWriter:
    def __init__(self, logdir: str, resume_step: int | None = None):
        from arjax.distributed import is_main

        self.writes = is_main()
        path = os.path.join(logdir, "metrics.jsonl")
        self.history: list[dict] = []
        if os.path.exists(path):
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            self.history = [r for r in rows if resume_step is None or r["step"] <= resume_step]
            if self.writes and len(self.history) < len(rows):
                with open(f"{path}.partial", "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in self.history)
                os.replace(f"{path}.partial", path)
        if not self.writes:
            return
        os.makedirs(logdir, exist_ok=True)
        self._tb = _summary_writer(logdir)
        self._jsonl = open(path, "a")

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.writes:
            return
        values = {k: float(np.asarray(v)) for k, v in metrics.items()}
        for name, value in values.items():
            self._tb.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.writes:
            self._tb.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.writes:
            self._tb.close()
            self._jsonl.close()
