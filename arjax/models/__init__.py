"""The generator networks: `raster_ar` (LlamaGen's GPT), `var` (next-scale VAR) and `flowar`
(scale-wise trunk + flow-matching head). Each file holds the family's config dataclass, a size
preset function and its top-level `nnx.Module` with the blocks it is built from; the
tokenizers live in `arjax.tokenizers`, the shared layers in `arjax.nn`.

At the jit boundary a model is the pair (graphdef, params): `params` is a plain nested dict of
arrays (what optimizers, checkpoints and converters see), `bind` rebuilds the module inside jit.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx


def split(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, Any]]:
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def bind(graphdef: nnx.GraphDef, params: dict[str, Any]) -> Any:
    return nnx.merge(graphdef, params, copy=False)


def param_count(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
