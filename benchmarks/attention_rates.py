"""The attention core alone, XLA:CPU against torch's fused CPU attention: VAR-d16's training
shape (680 tokens, 16 heads of 64, the block-causal scale mask), float32.

    python -m benchmarks.attention_rates [--batch 2] [--rounds 5] [--compete]
                                         [--torch-threads N]

Times, interleaved, the forward and the forward + backward (gradients of q, k, v) of
arjax's `attend` (jitted; on the CPU its fused kernel, `arjax.nn.cpu_attention`), of the same
with that kernel off ("XLA ops": einsum, masked float32 softmax, einsum, so XLA writes the
[B, 16, 680, 680] logits and probabilities) and of `F.scaled_dot_product_attention` with the
same mask as an additive bias (the official VAR's attention on CPU, whose kernel works on
blocks of queries and keys and never writes them whole). The floor is the two matmuls'
FLOPs (x3 with the backward) at the calibrated GEMM rate. Beside each time: the minor page
faults per call (`getrusage`), i.e. freshly touched output and scratch memory.
"""

from __future__ import annotations

import argparse
import resource

import jax
import jax.numpy as jnp
import numpy as np

from arjax.nn.attention import attend
from arjax.nn.scales import block_causal_mask
from benchmarks import harness

HEADS, HEAD_DIM, SIDES = 16, 64, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def with_faults(fn, faults: list[int]):
    """`fn` that also appends the minor page faults of each call to `faults`."""
    def run():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return run


def main(argv=None) -> None:
    import torch
    import torch.nn.functional as F

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    harness.add_arguments(parser, rounds=5)
    args = parser.parse_args(argv)
    harness.apply(args)
    mask = block_causal_mask(SIDES)
    tokens = mask.shape[0]
    shape = (args.batch, tokens, HEADS, HEAD_DIM)
    q, k, v, g = (np.random.default_rng(i).standard_normal(shape, np.float32) for i in range(4))
    machine = harness.calibrate(4 * q.size * 4)

    heads_major = lambda x: x.transpose(0, 2, 1, 3)
    jmask = jnp.asarray(mask)
    jq, jk, jv, jg = (jnp.asarray(x) for x in (q, k, v, g))

    def jitted(kernels: bool):
        """attend's forward and gradient, compiled with the fused CPU kernel on or off."""
        with harness.kernels(kernels):
            fwd = lambda q, k, v: attend(q, heads_major(k), heads_major(v), jmask)
            bwd = jax.grad(lambda q, k, v, g: jnp.sum(fwd(q, k, v) * g), (0, 1, 2))
            return (jax.jit(fwd).lower(jq, jk, jv).compile(),
                    jax.jit(bwd).lower(jq, jk, jv, jg).compile())

    forward, backward = jitted(True)
    xla_forward, xla_backward = jitted(False)

    tq, tk, tv, tg = (torch.from_numpy(heads_major(x).copy()) for x in (q, k, v, g))
    bias = torch.where(torch.from_numpy(mask), 0.0, float("-inf"))

    def torch_forward():
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv, attn_mask=bias)

    def torch_backward():
        leaves = [x.clone().requires_grad_() for x in (tq, tk, tv)]
        (F.scaled_dot_product_attention(*leaves, attn_mask=bias) * tg).sum().backward()
        return [x.grad for x in leaves]

    np.testing.assert_allclose(np.asarray(forward(jq, jk, jv)),
                               heads_major(torch_forward().numpy()), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(xla_forward(jq, jk, jv)), np.asarray(forward(jq, jk, jv)),
                               rtol=1e-4, atol=1e-4)
    calls = {"jax forward": lambda: jax.block_until_ready(forward(jq, jk, jv)),
             "jax forward, XLA ops": lambda: jax.block_until_ready(xla_forward(jq, jk, jv)),
             "torch forward": torch_forward,
             "jax forward+backward": lambda: jax.block_until_ready(backward(jq, jk, jv, jg)),
             "jax fwd+bwd, XLA ops": lambda: jax.block_until_ready(xla_backward(jq, jk, jv, jg)),
             "torch forward+backward": torch_backward}
    faults = {name: [] for name in calls}
    runs = {name: with_faults(fn, faults[name]) for name, fn in calls.items()}
    for run in runs.values():
        run()  # compile / warm up
    with harness.compete(args.compete):
        times = harness.interleave(runs, args.rounds)
        busy = harness.load()
    flops = 4 * args.batch * HEADS * tokens * tokens * HEAD_DIM
    print(f"attention [{args.batch}, {HEADS}, {tokens}, {tokens}] x {HEAD_DIM}"
          f"{harness.condition(args)}, load {busy}:")
    for name, t in times.items():
        floor_s, _ = harness.floor(0, flops * (3 if "backward" in name else 1), machine)
        ms = sorted(1e3 * x for x in t)
        print(f"  {name:<24} {ms[len(ms) // 2]:7.1f} ms ({ms[0]:.1f}-{ms[-1]:.1f}) = floor "
              f"x{min(t) / floor_s:.1f}, {int(np.median(faults[name][1:]))} page faults a call")


if __name__ == "__main__":
    main()
