"""How a model spends memory and precision: the compute/parameter dtypes and the per-block
rematerialisation every model config names (`dtype`, `param_dtype`, `remat`).

Mixed precision follows torch autocast, which the official recipes train with: matmuls,
convolutions and attention run in `dtype` (bfloat16 on accelerators); parameters, optimizer
state and EMA stay in `param_dtype` (float32); norms, softmax logits, AdaLN modulation, heads,
losses, quantiser distances and ODE states are float32 (each model says where).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

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
    """`cfg.dtype`, `cfg.param_dtype`, `cfg.remat` and `cfg.scan_layers` (those it has) are
    known values."""
    for field in ("dtype", "param_dtype"):
        value = getattr(cfg, field, "float32")
        check(value in DTYPES, f"{name}.{field}={value!r} must be one of {DTYPES}")
    remat = getattr(cfg, "remat", "none")
    check(remat in REMAT_POLICIES,
          f"{name}.remat={remat!r} must be one of {sorted(REMAT_POLICIES)}")
    scan = getattr(cfg, "scan_layers", False)
    check(isinstance(scan, bool), f"{name}.scan_layers={scan!r} must be true or false")


def dtypes(cfg) -> dict:
    """`dtype=` and `param_dtype=` keywords for flax layers, from a model config."""
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def float32(cfg) -> dict:
    """Keywords of a layer that computes in float32 (heads, AdaLN): storage as configured."""
    return dict(dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype))


def stacked(remat: str, call: Callable, prevent_cse: bool = True) -> Callable:
    """One block of a stack, `call(module, h, *rest) -> h`: its activations rematerialised
    in the backward pass per the `remat` policy (checked with the model config by
    `check_policy`; the forward is unchanged), its input and output kept split on the batch
    over the data-parallel mesh axes (`sharding.constrain_batch`: FSDP gathers weights, not
    rows). `prevent_cse=False` inside a scan, where the loop already keeps XLA from merging
    the recomputation into the forward."""
    inner = call if remat == "none" else nnx.remat(call, policy=REMAT_POLICIES[remat],
                                                   prevent_cse=prevent_cse)

    def run(module, h, *rest):
        return constrain_batch(inner(module, constrain_batch(h), *rest))

    return run


def run_blocks(blocks: Sequence[nnx.Module], call: Callable, h, *per_block: Sequence,
               remat: str = "none", scan: bool = False):
    """`h` through a stack of identical blocks: `h = call(block, h, *inputs)` for each block
    and its entry of every `per_block` sequence (arrays or pytrees, one per block; `None`
    entries throughout mean none), each step as `stacked` runs it.

    `scan=True` traces and compiles one block instead of `len(blocks)` (`lax.scan` over the
    blocks' weights, stacked here: one extra copy of the stack's weights per call, and the
    gradient comes back stacked too). The result is the same computation; the deeper the
    model, the more compile time it saves. The weights keep their per-block layout, so
    checkpoints, converters and sharding rules do not depend on it."""
    if not scan or len(blocks) < 2:
        run = stacked(remat, call)
        for i, block in enumerate(blocks):
            h = run(block, h, *(inputs[i] for inputs in per_block))
        return h
    graphdef, weights = _stacked_weights(blocks)
    xs = (weights, *(_stack(list(inputs)) for inputs in per_block))
    run = stacked(remat, call, prevent_cse=False)
    step = lambda h, x: (run(nnx.merge(graphdef, x[0], copy=False), h, *x[1:]), None)
    return jax.lax.scan(step, h, xs)[0]


def _stack(trees: Sequence):
    """Equal pytrees -> one pytree of arrays with a leading axis over them (`lax.scan`'s xs)."""
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _stacked_weights(blocks: Sequence[nnx.Module]):
    """(graphdef of one block, the blocks' weights stacked): what a scan over them merges."""
    return nnx.split(blocks[0])[0], _stack([nnx.to_pure_dict(nnx.state(b)) for b in blocks])


def decode_blocks(blocks: Sequence[nnx.Module], caches: Sequence, call: Callable, h,
                  span: tuple[int, int] | None = None, scan: bool = False):
    """Cached decoding through a stack: `h, cache = call(block, h, cache)` for each block and
    its cache -> (h, new caches), the residual stream kept split on the batch as `stacked`
    keeps it in training (a sampler traced under a mesh: FSDP-sharded weights are gathered,
    the rows and their caches stay on their devices).

    `scan=True` with a static `span` (begin, end): the call writes positions begin..end - 1 of
    caches laid out [B, heads, S, d] and reads none past them (a next-scale decode), so the
    stack runs as one `lax.scan` over the blocks' stacked weights and the filled part
    [:end] of their caches: one block traced instead of `len(blocks)` (compile time, as
    `run_blocks`), the full caches untouched except for the new positions."""
    if not scan or span is None or len(blocks) < 2:
        new = []
        for block, cache in zip(blocks, caches):
            h, cache = call(block, constrain_batch(h), cache)
            new.append(cache)
        return constrain_batch(h), new
    begin, end = span
    graphdef, weights = _stacked_weights(blocks)
    filled = _stack([jax.tree.map(lambda a: a[:, :, :end], cache) for cache in caches])

    def step(h, x):
        h, cache = call(nnx.merge(graphdef, x[0], copy=False), constrain_batch(h), x[1])
        return h, jax.tree.map(lambda a: a[:, :, begin:end], cache)

    h, written = jax.lax.scan(step, h, (weights, filled))
    new = [jax.tree.map(lambda a, w, i=i: a.at[:, :, begin:end].set(w[i]), cache, written)
           for i, cache in enumerate(caches)]
    return constrain_batch(h), new


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
