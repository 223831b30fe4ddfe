"""The memory table of docs/scaling.md: per-device training memory of the ImageNet presets at
their official global batch on 64 and 256 chips (`arjax.plan` for each cell).

    python -m benchmarks.memory_table                       # exact state bytes (no compiling)
    python -m benchmarks.memory_table --target tpu:v5e --mode estimate \
        --cells gpt_B:64,flowar_S:64                        # + compiled temporaries (jax[tpu])

State (parameters, Adam moments, EMA, batch) is exact for any target: it follows from shapes,
dtypes and shardings. Temporaries need a compilation per cell and policy (float32 / bfloat16 +
full remat); on a TPU target they are XLA:TPU's own buffer assignment.
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--mode", default="state", choices=("state", "estimate"))
    parser.add_argument("--mesh", default="data=-1,fsdp=8")
    parser.add_argument("--cells", default="", help="model:chips,... (default: all)")
    args = parser.parse_args(argv)
    cells = ([(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",")]
             if args.cells else [(m, n) for m in MODELS for n in (64, 256)])
    if args.target == "cpu":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count="
                                   f"{max(n for _, n in cells)}")
    from arjax import plan

    policies = POLICIES if args.mode != "state" else {"any": []}
    gib = lambda b: f"{b / 2**30:.2f}"
    print(f"target {args.target}, mesh {args.mesh}, mode {args.mode}; GiB per device")
    print("| model | chips | policy | batch/device | params | Adam | EMA | state | temps "
          "| peak | max batch/device |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, chips in cells:
        for policy, sets in policies.items():
            argv = ["--config", MODELS[name], "--devices", str(chips), "--mesh", args.mesh,
                    "--target", args.target, "--mode", args.mode]
            for s in sets:
                argv += ["--set", s]
            r = plan.run(plan.parse_args(argv + ["--json"]), quiet=True)
            state = r["params"] + r["opt_state"] + r["ema"]
            extra = ([gib(r["temp"]), gib(r["peak"]), str(r["max_per_device_batch"])]
                     if "temp" in r else ["-", "-", "-"])
            print(f"| {name} | {chips} | {policy} | {r['per_device_batch']} | "
                  f"{gib(r['params'])} | {gib(r['opt_state'])} | {gib(r['ema'])} | "
                  f"{gib(state)} | " + " | ".join(extra) + " |", flush=True)


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main(sys.argv[1:])
