"""The published ImageNet evaluation protocol of each model family, as data.

Choosing a preset fixes everything that changes the number: sample count and label balance,
guidance and truncation, the resolution samples are scored at, and the reference batch. Every
score arjax writes should be saved next to the protocol that produced it (`dataclasses.asdict`).
Values are those of the official READMEs / sampling scripts (see shared/specs).
"""

from __future__ import annotations

import dataclasses

import numpy as np

ADM_REF_256 = "VIRTUAL_imagenet256_labeled.npz"


@dataclasses.dataclass(frozen=True)
class EvalProtocol:
    family: str
    num_samples: int = 50_000
    class_balanced: bool = True  # 50 per class; False = uniformly random labels
    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"  # VAR: "linear" ramp over scales
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    generate_resolution: int = 256
    eval_resolution: int = 256  # LlamaGen generates at 384 and resizes (bicubic) to 256
    reference: str = ADM_REF_256
    evaluator: str = "ADM (pool_3 FID, sFID, IS 5k splits, P/R k=3)"


PROTOCOLS: dict[str, EvalProtocol] = {
    **{f"llamagen_{size}": EvalProtocol(
        "llamagen", class_balanced=False, cfg_scale=cfg, generate_resolution=384)
       for size, cfg in (("B", 2.0), ("L", 2.0), ("XL", 1.75), ("XXL", 1.75), ("3B", 1.65))},
    **{f"var_d{d}": EvalProtocol("var", cfg_scale=1.5, cfg_schedule="linear", top_k=900,
                                 top_p=0.96) for d in (16, 20, 24, 30)},
    "code": EvalProtocol("code", cfg_scale=1.5, cfg_schedule="linear", top_k=600, top_p=0.96),
}


def eval_labels(protocol: EvalProtocol, num_classes: int = 1000, seed: int = 0) -> np.ndarray:
    """int32 labels for the protocol's samples: num_samples/num_classes per class in class
    order (each sample gets its own key from its global index), or uniform random labels."""
    if protocol.class_balanced:
        per_class, rest = divmod(protocol.num_samples, num_classes)
        if rest:
            raise ValueError(f"{protocol.num_samples} samples are not divisible into "
                             f"{num_classes} balanced classes")
        return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_classes, protocol.num_samples).astype(np.int32)
