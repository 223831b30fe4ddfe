"""Device mesh, parameter sharding rules and global batches.

One code path for 1 device, 8 simulated CPU devices and a multi-host pod: shardings are derived
from regex rules on parameter paths (first match wins) for abstract trees (`jax.eval_shape`),
so states are created (`arjax.train.restore_or_init`) and loaded weights placed (`place`)
directly in their sharded layout.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from arjax.config import check

DATA_AXES = ("data", "fsdp")
SpecFn = Callable[[tuple[int, ...], Mesh], P]
Rule = tuple[str, P | SpecFn]


def make_mesh(axes: Sequence[tuple[str, int]] = (("data", -1), ("fsdp", 1)),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh such as (("data", -1), ("fsdp", 2)); -1 takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    names = tuple(name for name, _ in axes)
    sizes = [size for _, size in axes]
    known = math.prod(s for s in sizes if s != -1)
    check(sizes.count(-1) <= 1, f"mesh {axes}: at most one axis may be -1")
    check(len(devices) % known == 0,
          f"mesh {axes} needs a multiple of {known} devices, found {len(devices)}")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    check(math.prod(sizes) == len(devices),
          f"mesh {axes} has {math.prod(sizes)} slots but there are {len(devices)} devices")
    axis_types = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(tuple(sizes), names, axis_types=axis_types, devices=devices)


def fsdp(axis: str = "fsdp", min_size_mb: float = 4.0) -> SpecFn:
    """Shards the largest dimension divisible by the axis size; small tensors stay replicated."""

    def spec(shape: tuple[int, ...], mesh: Mesh) -> P:
        size = mesh.shape.get(axis, 1)
        if size == 1 or math.prod(shape) * 4 < min_size_mb * 2**20:
            return P()
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % size == 0:
                return P(*[axis if d == dim else None for d in range(len(shape))])
        return P()

    return spec


DEFAULT_RULES: tuple[Rule, ...] = ((r".*", fsdp()),)

# Named rule sets a config selects (`param_sharding`): every tensor of 4 MB or more split
# over `fsdp` (replicated on a mesh without that axis), every tensor whatever its size, or
# everything replicated.
RULE_SETS: dict[str, tuple[Rule, ...]] = {
    "fsdp": DEFAULT_RULES,
    "fsdp_all": ((r".*", fsdp(min_size_mb=0.0)),),
    "replicated": ((r".*", P()),),
}


def rules_named(name: str) -> tuple[Rule, ...]:
    check(name in RULE_SETS, f"param_sharding={name!r} is not a rule set; choose from "
          f"{sorted(RULE_SETS)}")
    return RULE_SETS[name]


def path_str(path: tuple[Any, ...]) -> str:
    """'layers/0/attention/wqkv/kernel' for a jax key path."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def param_shardings(abstract: Any, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> Any:
    """Maps every leaf of `abstract` (arrays or ShapeDtypeStructs) to a NamedSharding."""

    def one(path, leaf):
        name = path_str(path)
        for pattern, spec in rules:
            if re.fullmatch(pattern, name):
                spec = spec(tuple(leaf.shape), mesh) if callable(spec) else spec
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abstract)


def abstract_sharded(fn: Callable[[], Any], mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES
                     ) -> tuple[Any, Any]:
    """(ShapeDtypeStructs carrying their shardings, the shardings) of what `fn()` returns,
    without running it: a restore target, or the inputs of an ahead-of-time compilation."""
    abstract = jax.eval_shape(fn)
    shardings = param_shardings(abstract, mesh, rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    return target, shardings


def place(tree: Any, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> Any:
    """Puts a host (numpy) or device tree on the mesh in the layout `rules` give (the same
    layout `fit` trains in), once: jitted samplers then take device arrays and never
    re-upload weights per call."""
    return jax.device_put(tree, param_shardings(tree, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every data-parallel axis of the mesh."""
    return NamedSharding(mesh, P(tuple(a for a in DATA_AXES if a in mesh.axis_names)))


def constrain_batch(x: jax.Array) -> jax.Array:
    """`x` split on its leading (batch) dimension over the data-parallel axes of the mesh in
    context (`jax.set_mesh`, as `fit` and `arjax.plan` trace), the other dimensions whole.

    Applied to the residual stream at every block boundary, it makes FSDP what the rules say:
    weights sharded over `fsdp` are gathered for each block while activations stay with
    their rows. Without it XLA's propagation may keep the weights split and gather the
    batch instead (XLA:TPU did so for GPT-XL on 64 chips: every device held 8x its rows, a
    tensor-parallel layout nobody asked for). A no-op with no mesh in context or a batch that
    the data-parallel size does not divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in DATA_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, P(axes))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in DATA_AXES if a in mesh.axis_names)


def check_batch(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    n = data_parallel_size(mesh)
    check(batch_size > 0 and batch_size % n == 0,
          f"{what}={batch_size} must be a positive multiple of the {n} data-parallel devices "
          f"of the mesh {dict(mesh.shape)}; use e.g. {what}={max(n, batch_size // n * n or n)}")


def from_host(batch: Any, mesh: Mesh, sharding: NamedSharding | None = None) -> Any:
    """A numpy batch every process holds whole (labels to sample, images to score) -> global
    jax.Arrays sharded on the batch (or by `sharding`); each process uploads only the rows its
    devices hold."""
    sharding = sharding or batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(
        np.shape(x), sharding, lambda index: np.asarray(x)[index]), batch)


def to_global(local_batch: Any, mesh: Mesh) -> Any:
    """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded on the batch."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
