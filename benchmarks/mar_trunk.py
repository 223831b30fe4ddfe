"""One MAR trunk pass (encoder + decoder) at equal work, arjax against the official code: the
part of `benchmarks.mar_sampling` that does not depend on the schedule or the diffusion head.

    python -m benchmarks.mar_trunk --official /path/to/mar [--size B] [--rows 16]
                                   [--known 64 128 192] [--rounds 5] [--xla-ops]

`rows` is the trunk's batch (a sampling batch of rows / 2 with CFG), `known` the tokens known at
the step. The official side calls `forward_mae_encoder` (which drops the unknown tokens) and
`forward_mae_decoder`; arjax's `MAR.__call__` gets `cap=known`, as its sampler's runs do. Same
random weights (through the converter), interleaved calls; floor: the pass's matmul FLOPs (2
per weight per encoder and decoder token, buffer included) at the calibrated GEMM rate.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from arjax.models import bind
from benchmarks import harness
from benchmarks.mar_sampling import random_models, trunk_weights


def time_pass(graphdef, params, official, cfg, tokens, cond, known: int, weights, machine,
              rounds: int, rng, xla_ops: bool = False) -> str:
    """One printed line: both trunks on the same rows with `known` random known tokens each
    (with `xla_ops`, arjax's also compiled with its CPU kernels off)."""
    import torch

    rows, length = tokens.shape[:2]
    order = np.stack([rng.permutation(length) for _ in range(rows)])
    is_known = np.zeros((rows, length), bool)
    np.put_along_axis(is_known, order[:, :known], True, axis=1)
    inputs = (params, jnp.asarray(tokens), jnp.asarray(is_known), jnp.asarray(cond))
    trunk = lambda p, t, k, c: bind(graphdef, p)(t, k, c, cap=known)
    ours, compile_s = harness.compiled(trunk, *inputs)
    runs = {"arjax": lambda: jax.block_until_ready(ours(*inputs))}
    if xla_ops:
        with harness.kernels(False):
            plain = harness.compiled(trunk, *inputs)[0]
        runs["arjax, XLA ops"] = lambda: jax.block_until_ready(plain(*inputs))
    mask = torch.from_numpy((~is_known).astype(np.float32))  # official: 1 = unknown

    def theirs():
        with torch.no_grad():
            z = official.forward_mae_encoder(torch.from_numpy(tokens), mask,
                                             torch.from_numpy(cond))
            return official.forward_mae_decoder(z, mask)

    a, b = np.asarray(jax.block_until_ready(ours(*inputs))), theirs().numpy()
    times = harness.interleave({**runs, "official": theirs}, rounds)
    enc, dec = weights
    pad = cfg.buffer_size
    flops = 2 * rows * (enc * (pad + known) + dec * (pad + length))
    floor_s = harness.floor(4 * (enc + dec), flops, machine)[0]
    rel = np.abs(a - b).max() / np.abs(b).max()
    return (f"{known} known: floor {floor_s:.2f} s | "
            + " | ".join(harness.columns(times, floor_s, f" (compile {compile_s:.0f} s)")
                         + ([harness.variant(times, "arjax, XLA ops")] if xla_ops else []))
            + f" | max relative difference {rel:.1e} | load {harness.load()}")


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="checkout of LTH14/mar")
    parser.add_argument("--size", default="B", choices=("tiny", "B", "L", "H"))
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--known", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--xla-ops", action="store_true",
                        help="also time arjax with its CPU kernels off (XLA's attention)")
    args = parser.parse_args(argv)
    cfg, graphdef, params, official = random_models(args.official, args.size, 100)
    enc, dec = trunk_weights(params)
    machine = harness.calibrate(4 * (enc + dec))
    rng = np.random.default_rng(0)
    length, rows = cfg.seq_len, args.rows
    tokens = rng.normal(size=(rows, length, cfg.token_dim)).astype(np.float32)
    cond = rng.normal(size=(rows, cfg.width)).astype(np.float32)
    print(f"MAR-{args.size} trunk, {rows} rows, float32, torch {torch.get_num_threads()} "
          "threads")
    for known in args.known:
        print(time_pass(graphdef, params, official, cfg, tokens, cond, known, (enc, dec),
                        machine, args.rounds, rng, args.xla_ops), flush=True)


if __name__ == "__main__":
    main()
