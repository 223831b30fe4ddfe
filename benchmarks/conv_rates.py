"""XLA:CPU's 3x3 convolution rate on the VAE decoders' shapes, with and without its YNNPACK
fusions, against torch (oneDNN) and the machine's GEMM rate; with `--kind matmul`, its matmul
rate on the transformers' shapes under each of its matmul back-ends, against torch.

    python -m benchmarks.conv_rates [--kind conv|matmul] [--batch 2] [--rounds 3]

The decoders of VAR's multi-scale VQ-VAE (ch 160) and of the KL-16 VAE (FlowAR, MAR; ch 128)
spend nearly all their FLOPs in 3x3 same-padded convolutions, one width per resolution (ch_mult
1, 1, 2, 2, 4 at 256 px). XLA's flags are fixed when a process starts, so every XLA setting
runs in its own worker process (`--worker`), the settings take turns round by round, and torch
runs in this one; GFLOP/s per shape, median of `--rounds`. Which XLA setting arjax uses by
default and why: `arjax.xla_defaults`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from benchmarks import harness

#: (decoder, resolution, channels): every 3x3 conv of that level has channels in and out.
SHAPES = [("VAR VQ-VAE", 16, 640), ("VAR VQ-VAE", 64, 320), ("VAR VQ-VAE", 128, 160),
          ("VAR VQ-VAE", 256, 160), ("KL-16", 16, 512), ("KL-16", 64, 256),
          ("KL-16", 128, 128), ("KL-16", 256, 128)]
#: XLA:CPU settings compared: name -> XLA_FLAGS of the worker (ARJAX_XLA_DEFAULTS=0 keeps
#: arjax from adding its own).
SETTINGS = {"XLA, YNNPACK fusions (XLA's default)": "",
            "XLA, YNNPACK fusions off (arjax's default)":
                "--xla_cpu_experimental_ynn_fusion_type="}
#: (what, m, k, n) of `tanh(x @ w)`: a 2048^3 reference, VAR-d16's last scale at batch 8 with
#: CFG (fc1, fc2), MAR-B's decoder rows at batch 1 with CFG.
MATMULS = [("reference", 2048, 2048, 2048), ("VAR-d16 fc1", 4096, 1024, 4096),
           ("VAR-d16 fc2", 4096, 4096, 1024), ("MAR-B fc1", 640, 768, 3072)]
MATMUL_SETTINGS = {"XLA, Eigen dots (arjax's default)": "--xla_cpu_experimental_ynn_fusion_type=",
                   "XLA, oneDNN dot fusion": "--xla_cpu_experimental_ynn_fusion_type= "
                                             "--xla_cpu_experimental_onednn_fusion_type=dot",
                   "XLA, YNNPACK dot fusion": "--xla_cpu_experimental_ynn_fusion_type=dot"}


def flops(batch: int, size: int, ch: int) -> float:
    return 2.0 * batch * size * size * ch * ch * 9


def xla_rates(kind: str, batch: int, repeats: int) -> list[float]:
    import jax
    import jax.numpy as jnp

    rates = []
    if kind == "matmul":
        dense = jax.jit(lambda x, w: jnp.tanh(x @ w))
        for _, m, k, n in MATMULS:
            x = jax.random.normal(jax.random.key(0), (m, k))
            w = jax.random.normal(jax.random.key(1), (k, n)) * 0.02
            t = harness.median_s(lambda x=x, w=w: dense(x, w).block_until_ready(), repeats)
            rates.append(2.0 * m * k * n / t / 1e9)
        return rates
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    for _, size, ch in SHAPES:
        x = jax.random.normal(jax.random.key(0), (batch, size, size, ch))
        w = jax.random.normal(jax.random.key(1), (3, 3, ch, ch)) * 0.02
        t = harness.median_s(lambda x=x, w=w: conv(x, w).block_until_ready(), repeats)
        rates.append(flops(batch, size, ch) / t / 1e9)
    return rates


def torch_rates(kind: str, batch: int, repeats: int) -> list[float] | None:
    try:
        import torch
    except ImportError:
        return None
    rates = []
    with torch.no_grad():
        if kind == "matmul":
            for _, m, k, n in MATMULS:
                x, w = torch.randn(m, k), torch.randn(k, n) * 0.02
                t = harness.median_s(lambda x=x, w=w: torch.tanh(x @ w), repeats)
                rates.append(2.0 * m * k * n / t / 1e9)
            return rates
        for _, size, ch in SHAPES:
            conv = torch.nn.Conv2d(ch, ch, 3, padding=1).to(memory_format=torch.channels_last)
            x = torch.randn(batch, ch, size, size).contiguous(memory_format=torch.channels_last)
            t = harness.median_s(lambda conv=conv, x=x: conv(x), repeats)
            rates.append(flops(batch, size, ch) / t / 1e9)
    return rates


def worker_rates(kind: str, flags: str, batch: int) -> list[float]:
    env = {**os.environ, "XLA_FLAGS": flags, "ARJAX_XLA_DEFAULTS": "0"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.conv_rates", "--worker",
                          "--kind", kind, "--batch", str(batch)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="conv", choices=("conv", "matmul"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(xla_rates(args.kind, args.batch, 3)))
        return
    harness.calibrate(64 << 20)
    settings = MATMUL_SETTINGS if args.kind == "matmul" else SETTINGS
    reference = "torch (matmul)" if args.kind == "matmul" else "torch (oneDNN, channels-last)"
    runs: dict[str, list[list[float]]] = {name: [] for name in settings}
    runs[reference] = []
    for r in range(args.rounds):
        names = list(settings) if r % 2 == 0 else list(settings)[::-1]
        for name in names:
            runs[name].append(worker_rates(args.kind, settings[name], args.batch))
        torch = torch_rates(args.kind, args.batch, 3)
        if torch is not None:
            runs[reference].append(torch)
    runs = {name: rounds for name, rounds in runs.items() if rounds}
    if args.kind == "matmul":
        rows = [(what, f"{m} x {k} x {n}") for what, m, k, n in MATMULS]
        print(f"tanh(x @ w), GFLOP/s median of {args.rounds} rounds (min-max) | load "
              f"{harness.load()}")
    else:
        rows = [(decoder, f"{size} px, {ch} channels") for decoder, size, ch in SHAPES]
        print(f"3x3 convolutions, batch {args.batch}, GFLOP/s median of {args.rounds} rounds "
              f"(min-max) | load {harness.load()}")
    print("| workload | shape | " + " | ".join(runs) + " |")
    print("|---|---|" + "---|" * len(runs))
    for i, (what, shape) in enumerate(rows):
        cells = []
        for rounds in runs.values():
            rates = [r[i] for r in rounds]
            cells.append(f"{statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f})")
        print(f"| {what} | {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
