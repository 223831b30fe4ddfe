"""Memory planner: what one training step of a preset needs on each device of a mesh.

    python -m arjax.plan --config flowar_imagenet:imagenet256_H --devices 64 \
        --mesh data=-1,fsdp=8 [--set flowar_train.batch_size=2048 ...] \
        [--target cpu | tpu:v5e | tpu:v5p | tpu:v4 | tpu:v6e] [--hbm-gib 16]

The generator's train step (the experiment's `plan_stage`: model, loss, optimizer, EMA,
precision and remat as configured) is compiled ahead of time against abstract arrays with
the shardings `fit` uses; nothing is allocated. Parameters, optimizer state, EMA and the batch
are exact per-device bytes (shapes, dtypes and shardings). Temporaries (activations,
gradients, gathered weights) come from XLA's buffer assignment for the target: meaningful for
a TPU target, which needs only the `libtpu` package (`pip install 'jax[tpu]==0.10.2'`, no TPU:
the compiler runs here, as maxtext's train_compile does); on the CPU target they are XLA:CPU's
schedule and only an order of magnitude. The largest per-device batch that fits `--hbm-gib`
is estimated from one compilation (`--mode estimate`) or searched by compiling (`search`);
`--mode state` prints the exact state bytes without compiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import sys
from collections.abc import Sequence

HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Chips -> topology name, per generation (2D tori for v5e/v6e, 3D for v4/v5p).
TOPOLOGIES = {
    "v5e": {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    "v6e": {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    "v4": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
           256: "4x8x8"},
    "v5p": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8"},
}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m arjax.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="<experiment>:<preset>, e.g. "
                   "var_imagenet:imagenet256_d16")
    p.add_argument("--devices", type=int, required=True, help="chips / devices in the mesh")
    p.add_argument("--mesh", default="data=-1,fsdp=1", help="axis=size,... (-1: the rest)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as for the experiments")
    p.add_argument("--target", default="cpu", help="cpu or tpu:<v4|v5e|v5p|v6e>")
    p.add_argument("--hbm-gib", type=float, default=None,
                   help="memory per device (default: the TPU generation's HBM, 16 on cpu)")
    p.add_argument("--mode", default="estimate", choices=("state", "estimate", "search"),
                   help="state: exact state bytes, no compilation; estimate: one compilation, "
                   "largest batch assuming temporaries scale with it; search: compile the "
                   "largest batch to check it (3-5 compilations)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
    from arjax.config import check

    axes = []
    for part in text.split(","):
        name, _, size = part.partition("=")
        check(name.strip() and size.strip().lstrip("-").isdigit(),
              f"--mesh {text!r}: expected axis=size pairs such as data=-1,fsdp=8")
        axes.append((name.strip(), int(size)))
    return tuple(axes)


def target_devices(target: str, count: int):
    """Abstract devices of the target: simulated CPU devices, or a TPU topology's devices
    (compilation only)."""
    import jax

    from arjax.config import check

    if target == "cpu":
        check(len(jax.devices()) >= count,
              f"--devices {count} but JAX has {len(jax.devices())} CPU devices (set before JAX "
              "starts; `python -m arjax.plan` does it)")
        return jax.devices()[:count]
    generation = target.partition(":")[2]
    check(target.startswith("tpu:") and generation in TOPOLOGIES,
          f"--target {target!r}: use cpu or tpu:<{'|'.join(TOPOLOGIES)}>")
    check(count in TOPOLOGIES[generation],
          f"--devices {count}: a {generation} slice has one of {sorted(TOPOLOGIES[generation])}"
          " chips here")
    try:
        from jax.experimental import topologies

        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{generation}:{TOPOLOGIES[generation][count]}")
    except Exception as e:  # no libtpu: say how to get it
        raise_config(f"--target {target} needs libtpu (pip install 'jax[tpu]==0.10.2' in a "
                     f"separate environment; no TPU is needed): {type(e).__name__}: "
                     f"{str(e).splitlines()[0][:200] if str(e) else ''}")
    return topology.devices


def raise_config(message: str):
    from arjax.config import ConfigError

    raise ConfigError(message) from None


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` (abstract leaves) laid out by `shardings`."""
    import jax
    import numpy as np

    leaves = jax.tree.leaves(jax.tree.map(
        lambda a, s: math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize,
        tree, shardings))
    return int(sum(leaves))


def abstract_step(stage, mesh, rules, per_device_batch: int):
    """(jitted train step, abstract sharded state, abstract sharded batch): nothing is
    allocated."""
    import jax

    from arjax import sharding
    from arjax.experiment.pipeline import stage_program

    _, init_fn, train_step = stage_program(stage.module_fn, stage.loss_fn, stage.stage)
    state, shardings = sharding.abstract_sharded(init_fn, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh)
    global_batch = per_device_batch * sharding.data_parallel_size(mesh)
    batch = {k: jax.ShapeDtypeStruct((global_batch, *v.shape), v.dtype, sharding=batch_sharding)
             for k, v in stage.example.items()}
    step = jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    return step, state, batch


def compiled_peak(stage, mesh, rules, per_device_batch: int) -> tuple[dict, object]:
    """(footprint, executable). A step whose temporaries alone exceed the target's memory
    is refused by XLA:TPU; its footprint then comes from the figure in that error (with
    `over_hbm`, and no executable) rather than a traceback."""
    import jax

    step, state, batch = abstract_step(stage, mesh, rules, per_device_batch)
    with jax.set_mesh(mesh):  # traced as `fit` traces it (activation constraints)
        lowered = step.lower(state, batch)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as error:
            temp = refused_temporaries(str(error))
            if temp is None:
                raise
            args, kept = device_bytes((state, batch)), device_bytes(state)
            return {"argument": args, "output": kept, "alias": kept, "temp": temp,
                    "peak": args + temp, "over_hbm": True}, None
    return footprint(compiled), compiled


def refused_temporaries(message: str) -> int | None:
    """Bytes of temporaries in XLA's "Ran out of memory ... the total memory required for
    HLO temporaries (17.67G) exceeds available HBM" (binary units), or None."""
    found = re.search(r"RESOURCE_EXHAUSTED.*HLO temporaries \(([\d.]+)([KMGT]?)\)", message,
                      re.S)
    if not found:
        return None
    return int(float(found[1]) * 1024 ** " KMGT".index(found[2] or " "))


def footprint(compiled) -> dict:
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
            "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes, "peak": peak}


def device_bytes(tree) -> int:
    """Bytes one device holds of an abstract sharded tree."""
    import jax
    import numpy as np

    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def plan(stage, mesh, rules, per_device_batch: int, hbm_bytes: float, mode: str = "estimate"
         ) -> dict:
    """Per-device bytes of one train step and the largest per-device batch under
    `hbm_bytes` (peak = arguments + outputs - donated aliases + temporaries).

    mode: "state" (exact state and batch bytes only, no compilation), "estimate" (one
    compilation; the largest batch assumes temporaries grow in proportion to the batch) or
    "search" (compiles at twice the batch, extrapolates linearly and checks the result by
    compiling it, stepping down while it does not fit: 3-5 compilations)."""
    _, state, batch = abstract_step(stage, mesh, rules, per_device_batch)
    out = {"per_device_batch": per_device_batch, "params": device_bytes(state.params),
           "opt_state": device_bytes(state.opt_state), "ema": device_bytes(state.ema),
           "batch": device_bytes(batch)}
    if mode == "state":
        return out
    mem, compiled = compiled_peak(stage, mesh, rules, per_device_batch)
    flops = (compiled.cost_analysis() or {}).get("flops") if compiled else None
    out.update(temp=mem["temp"], peak=mem["peak"], compiled=mem, xla_flops_per_device=flops,
               over_hbm=mem.get("over_hbm", False))
    fixed, per_row = mem["peak"] - mem["temp"], mem["temp"] / per_device_batch
    if mode == "search":
        double = compiled_peak(stage, mesh, rules, 2 * per_device_batch)[0]["peak"]
        per_row = max((double - mem["peak"]) / per_device_batch, 1.0)
        fixed = mem["peak"] - per_row * per_device_batch
    guess = int((hbm_bytes - fixed) // max(per_row, 1.0))
    out.update(bytes_per_row=per_row, max_per_device_batch=max(guess, 0))
    for _ in range(3 if mode == "search" else 0):  # compile the guess; step down while over
        if guess < 1:
            break
        peak = compiled_peak(stage, mesh, rules, guess)[0]["peak"]
        out.update(max_per_device_batch=guess,
                   max_batch_check={"per_device_batch": guess, "peak": peak,
                                    "fits": peak <= hbm_bytes})
        if peak <= hbm_bytes:
            break
        guess -= max(1, math.ceil((peak - hbm_bytes) / per_row))
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.target == "cpu":  # simulated devices: before JAX starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
    from arjax.experiment.cli import exit_on_user_error

    exit_on_user_error(lambda: run(args))


def run(args: argparse.Namespace, quiet: bool = False) -> dict:
    from arjax import config as cfglib
    from arjax import sharding

    experiment, _, preset = args.config.partition(":")
    cfglib.check(bool(preset), f"--config {args.config!r}: expected <experiment>:<preset>, e.g."
                 " flowar_imagenet:imagenet256_S")
    try:
        module = importlib.import_module(f"experiments.{experiment}")
    except ModuleNotFoundError:
        raise_config(f"--config {args.config!r}: no experiment named {experiment!r} in "
                     "experiments/")
    cfglib.check(preset in module.PRESETS, f"--config {args.config!r}: no preset {preset!r}; "
                 f"choose from {sorted(module.PRESETS)}")
    cfg = cfglib.override(module.PRESETS[preset], args.set)
    stage = module.plan_stage(cfg)
    stage.stage.validate(stage.name)
    devices = target_devices(args.target, args.devices)
    mesh = sharding.make_mesh(parse_mesh(args.mesh), devices)
    sharding.check_batch(stage.stage.batch_size, mesh, f"{stage.name}_train.batch_size")
    per_device = stage.stage.batch_size // sharding.data_parallel_size(mesh)
    generation = args.target.partition(":")[2]
    hbm = (args.hbm_gib or HBM_GIB.get(generation, 16)) * 2**30
    result = plan(stage, mesh, sharding.rules_named(cfg.param_sharding), per_device, hbm,
                  args.mode)
    result = {"config": args.config, "target": args.target, "devices": args.devices,
              "mesh": dict(mesh.shape), "global_batch": stage.stage.batch_size,
              "hbm_bytes": hbm, "overrides": args.set, **result,
              "model": dataclasses.asdict(stage.model_cfg)}
    if quiet:
        return result
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print_table(result)
    return result


def print_table(r: dict) -> None:
    model = r["model"]
    policy = f"dtype={model.get('dtype')} remat={model.get('remat')}"
    print(f"{r['config']} on {r['devices']} x {r['target']} mesh {r['mesh']} ({policy}), "
          f"global batch {r['global_batch']} = {r['per_device_batch']} per device")
    rows = [("parameters", "params"), ("optimizer state", "opt_state"), ("EMA", "ema"),
            ("batch", "batch"), ("temporaries (activations, grads)", "temp"),
            ("peak (args + outputs - donated + temps)", "peak")]
    for name, key in rows:
        if key in r:
            print(f"  {name:42s} {gib(r[key]):>12s}")
    if r.get("over_hbm"):
        print("  XLA refused to compile the step: its temporaries alone exceed the memory "
              "(figure from its error)")
    if "max_per_device_batch" in r:
        note = " (CPU temporaries: an order of magnitude only)" if r["target"] == "cpu" else ""
        check = r.get("max_batch_check")
        how = (f"compiled: peak {gib(check['peak'])}, fits={check['fits']}" if check
               else "estimate: temporaries in proportion to the batch")
        print(f"  largest per-device batch in {gib(r['hbm_bytes'])}: "
              f"{r['max_per_device_batch']} ({how}){note}")


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
