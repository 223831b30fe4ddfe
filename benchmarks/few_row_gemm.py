"""How fast each library streams weights through a few-row matmul, against the read bandwidth.

    python -m benchmarks.few_row_gemm [--mb 128] [--rows 1 2 8 16 64] [--rounds 5] [--compete]

Batch-1/8 decoding multiplies a handful of rows (2 x batch with CFG, or MAR's 2 x tokens of a
step) by every weight matrix once per step, so its floor is the weights' bytes over the read
bandwidth. This prints, per row count, the GB/s of weights that XLA:CPU's dot (`x @ W`, and
the transposed `W^T` layout), a fused multiply-reduce formulation, torch and numpy reach on
`--mb` of float32 weights (K = 1024), interleaved, median of `--rounds`; and the machine's read
bandwidth at that size (`benchmarks.harness`). Also arjax's few-row CPU kernel on weights
packed once (`arjax.nn.few_rows`, what its decoding uses at 8-16 rows; needs g++), checked
against numpy.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from arjax.nn import few_rows
from benchmarks import harness

K = 1024


def runs(rows: int, w: np.ndarray) -> dict:
    x = np.random.default_rng(1).normal(size=(rows, K)).astype(np.float32)
    wj, wtj, xj = jnp.asarray(w), jnp.asarray(w.T), jnp.asarray(x)
    dot = jax.jit(lambda x, w: x @ w)
    dot_t = jax.jit(lambda x, wt: jnp.einsum("mk,nk->mn", x, wt))
    fused = jax.jit(lambda x, wt: jnp.sum(wt[:, None, :] * x[None, :, :], axis=-1).T)
    out = {"xla dot": lambda: dot(xj, wj).block_until_ready(),
           "xla dot W^T": lambda: dot_t(xj, wtj).block_until_ready(),
           "xla mul-reduce": lambda: fused(xj, wtj).block_until_ready(),
           "numpy": lambda: x @ w}
    if rows <= max(few_rows.ROWS) and few_rows.available():
        kernel, panels = jax.jit(few_rows.matmul), jax.block_until_ready(few_rows.pack(wj))
        error = np.abs(np.asarray(kernel(xj, panels)) - x @ w).max() / np.abs(x @ w).max()
        assert error < 1e-5, f"packed kernel differs from numpy by {error:.1e}"
        out["packed kernel"] = lambda: kernel(xj, panels).block_until_ready()
    try:
        import torch
        xt, wt = torch.from_numpy(x), torch.from_numpy(w)
        out["torch"] = lambda: xt @ wt
    except ImportError:
        pass
    for fn in out.values():
        fn()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=128)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 16, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compete", action="store_true")
    args = parser.parse_args(argv)
    n = int(args.mb * 1e6 / (4 * K)) // 16 * 16
    w = np.random.default_rng(0).normal(size=(K, n)).astype(np.float32)
    harness.calibrate(w.nbytes)
    with harness.compete(args.compete):
        for rows in args.rows:
            times = harness.interleave(runs(rows, w), args.rounds)
            rates = {k: w.nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
            print(f"rows {rows}{' (one core busy)' if args.compete else ''}: " + ", ".join(
                f"{k} {r:.1f}" for k, r in rates.items()) + f" GB/s | load {harness.load()}",
                flush=True)


if __name__ == "__main__":
    main()
