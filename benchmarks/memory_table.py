"""The memory table of docs/scaling.md: per-device training memory of the ImageNet presets at
their official global batch on 64 and 256 chips (`arjax.plan` for each cell).

    python -m benchmarks.memory_table                       # exact state bytes (no compiling)
    python -m benchmarks.memory_table --target tpu:v5e --mode estimate \
        --cells gpt_B:64,flowar_S:64                        # + compiled temporaries (jax[tpu])
    ... --mode estimate --shallow                           # from 1- and 2-block compiles
    ... --mode estimate --scan                              # full depth, blocks scanned
    ... --policies bf16+remat                               # one policy only

State (parameters, Adam moments, EMA, batch) is exact for any target: it follows from shapes,
dtypes and shardings. Temporaries need a compilation per cell and policy (float32 / bfloat16 +
full remat); on a TPU target they are XLA:TPU's own buffer assignment. A full-depth XLA:TPU
compilation takes 15+ minutes on a 2-core machine, so `--shallow` compiles each cell with 1 and
2 blocks per stack (FlowAR: trunk and flow head separately) and extends temporaries and peak
linearly in the block count (every block of a stack has the same shapes, so its buffers repeat;
the check against a full-depth compile is in docs/scaling.md). `--scan` compiles the full
depth with the blocks as one `lax.scan` (`model.scan_layers`): exact for that program, at about
the cost of a 1-block compile.
"""

from __future__ import annotations

import argparse
import os
import sys

MODELS = {"flowar_S": "flowar_imagenet:imagenet256_S", "flowar_L": "flowar_imagenet:imagenet256_L",
          "flowar_H": "flowar_imagenet:imagenet256_H", "var_d16": "var_imagenet:imagenet256_d16",
          "var_d30": "var_imagenet:imagenet256_d30", "gpt_B": "llamagen_imagenet:imagenet256_B",
          "gpt_XL": "llamagen_imagenet:imagenet256_XL",
          "gpt_3B": "llamagen_imagenet:imagenet256_3B"}
POLICIES = {"f32": [], "bf16+remat": ["model.dtype=bfloat16", "model.remat=full"]}
STACKS = {"flowar": ("depth", "head_depth"), "var": ("depth",), "gpt": ("depth",)}
#: Fields a family derives from the block count unless set (VAR: width 64 x depth, heads =
#: depth): a shallow compile pins them to the full model's values.
PINNED = {"var": lambda m: [f"model.width={m['width'] or 64 * m['depth']}",
                            f"model.heads={m['heads'] or m['depth']}"]}


def shallow(run, argv: list[str], name: str, planned: dict) -> dict:
    """Temporaries and peak of the full-depth cell from compiles with 1 and 2 blocks per
    stack: value = v(1, ..) + sum over stacks of (depth - 1) * (v(.., 2, ..) - v(1, ..)).
    `consistent` is False when that cannot be a real program's (negative temporaries, or a
    peak below the state it holds): XLA compiled the 2-block step differently. `planned`:
    the full-depth cell's `--mode state` result."""
    full = planned["model"]
    family = name.split("_")[0]
    stacks = STACKS[family]
    argv = argv + [a for p in PINNED.get(family, lambda m: [])(full) for a in ("--set", p)]
    ones = [f"model.{s}=1" for s in stacks]
    base = run(argv + ["--mode", "estimate"] + [a for o in ones for a in ("--set", o)])
    out = dict(base)
    for s in stacks:
        sets = [o for o in ones if not o.startswith(f"model.{s}=")] + [f"model.{s}=2"]
        two = run(argv + ["--mode", "estimate"] + [a for o in sets for a in ("--set", o)])
        for key in ("temp", "peak"):
            out[key] = out[key] + (full[s] - 1) * (two[key] - base[key])
    state = planned["params"] + planned["opt_state"] + planned["ema"]
    out["consistent"] = out["temp"] >= 0 and out["peak"] >= state
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--mode", default="state", choices=("state", "estimate"))
    parser.add_argument("--mesh", default="data=-1,fsdp=8")
    parser.add_argument("--cells", default="", help="model:chips,... (default: all)")
    parser.add_argument("--shallow", action="store_true",
                        help="temporaries from 1- and 2-block compiles, extended linearly")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help=f"which of {', '.join(POLICIES)} to compile (estimate mode)")
    parser.add_argument("--scan", action="store_true",
                        help="model.scan_layers=true: full depth at the compile cost of one "
                        "block per stack (exact for the scanned program)")
    args = parser.parse_args(argv)
    cells = ([(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",")]
             if args.cells else [(m, n) for m in MODELS for n in (64, 256)])
    if args.target == "cpu":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count="
                                   f"{max(n for _, n in cells)}")
    from arjax import plan

    chosen = args.policies.split(",")
    unknown = set(chosen) - set(POLICIES)
    if unknown:
        parser.error(f"--policies: unknown {sorted(unknown)}; choose from {sorted(POLICIES)}")
    policies = {p: POLICIES[p] for p in chosen} if args.mode != "state" else {"any": []}
    if args.scan:
        policies = {f"{name} scan": sets + ["model.scan_layers=true"]
                    for name, sets in policies.items()}
    gib = lambda b: f"{b / 2**30:.2f}"
    print(f"target {args.target}, mesh {args.mesh}, mode {args.mode}; GiB per device")
    print("| model | chips | policy | batch/device | params | Adam | EMA | state | temps "
          "| peak | max batch/device |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    run = lambda argv: plan.run(plan.parse_args(argv + ["--json"]), quiet=True)
    for name, chips in cells:
        for policy, sets in policies.items():
            argv = ["--config", MODELS[name], "--devices", str(chips), "--mesh", args.mesh,
                    "--target", args.target]
            for s in sets:
                argv += ["--set", s]
            full = run(argv + ["--mode", "state"])
            r = full
            if args.mode != "state":
                r = shallow(run, argv, name, full) if args.shallow else run(argv + ["--mode",
                                                                              args.mode])
            state = full["params"] + full["opt_state"] + full["ema"]
            extra = ["-", "-", "-"]
            if "temp" in r and not r.get("consistent", True):
                extra = [f"({gib(r['temp'])})", f"({gib(r['peak'])})",
                         "untrusted: 1- and 2-block compiles disagree"]
            elif "temp" in r:  # largest batch: temporaries in proportion to the batch
                fixed, per_row = r["peak"] - r["temp"], r["temp"] / r["per_device_batch"]
                best = int((full["hbm_bytes"] - fixed) // max(per_row, 1.0))
                extra = [gib(r["temp"]), gib(r["peak"]), str(max(best, 0))
                         + (" (XLA refused: over HBM)" if r.get("over_hbm") else "")]
            print(f"| {name} | {chips} | {policy} | {full['per_device_batch']} | "
                  f"{gib(full['params'])} | {gib(full['opt_state'])} | {gib(full['ema'])} | "
                  f"{gib(state)} | " + " | ".join(extra) + " |", flush=True)


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main(sys.argv[1:])
