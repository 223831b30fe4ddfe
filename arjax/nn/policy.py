"""How a model spends memory and precision: the compute/parameter dtypes and the per-block
rematerialisation every model config names (`dtype`, `param_dtype`, `remat`).

Mixed precision follows torch autocast, which the official recipes train with: matmuls,
convolutions and attention run in `dtype` (bfloat16 on accelerators); parameters, optimizer
state and EMA stay in `param_dtype` (float32); norms, softmax logits, AdaLN modulation, heads,
losses, quantiser distances and ODE states are float32 (each model says where).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.config import check
from arjax.sharding import constrain_batch

DTYPES = ("float32", "bfloat16", "float16")

# Which activations a rematerialised block keeps for the backward pass: "full" only its
# input (least memory, one extra forward), "dots" the results of its weight matmuls.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_policy(cfg, name: str = "model") -> None:
    """`cfg.dtype`, `cfg.param_dtype` and `cfg.remat` (those it has) are known values."""
    for field in ("dtype", "param_dtype"):
        value = getattr(cfg, field, "float32")
        check(value in DTYPES, f"{name}.{field}={value!r} must be one of {DTYPES}")
    remat = getattr(cfg, "remat", "none")
    check(remat in REMAT_POLICIES,
          f"{name}.remat={remat!r} must be one of {sorted(REMAT_POLICIES)}")


def dtypes(cfg) -> dict:
    """`dtype=` and `param_dtype=` keywords for flax layers, from a model config."""
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def float32(cfg) -> dict:
    """Keywords of a layer that computes in float32 (heads, AdaLN): storage as configured."""
    return dict(dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype))


def stacked(remat: str, call: Callable) -> Callable:
    """One block of a stack, `call(module, h, *rest) -> h`: its activations rematerialised
    in the backward pass per the `remat` policy (checked with the model config by
    `check_policy`; the forward is unchanged), its input and output kept split on the batch
    over the data-parallel mesh axes (`sharding.constrain_batch`: FSDP gathers weights, not
    rows)."""
    inner = call if remat == "none" else nnx.remat(call, policy=REMAT_POLICIES[remat])

    def run(module, h, *rest):
        return constrain_batch(inner(module, constrain_batch(h), *rest))

    return run


_conv = {"dtype": None, "param_dtype": jnp.float32}


@contextlib.contextmanager
def conv_dtypes(cfg):
    """The conv tokenizers' layers built inside take `cfg`'s dtypes (`conv_kwargs`); one
    switch instead of threading two dtypes through every res/attention/resample block."""
    previous = dict(_conv)
    _conv.update(dtypes(cfg))
    try:
        yield
    finally:
        _conv.update(previous)


def conv_kwargs() -> dict:
    return dict(_conv)
