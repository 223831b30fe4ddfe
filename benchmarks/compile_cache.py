"""What the persistent compilation cache (`arjax.compilation_cache`) saves: each ImageNet-size
sampler compiled ahead of time in a fresh process with an empty cache, then in a second fresh
process reading the cache the first one wrote (random weights; compile time does not depend
on them).

    python -m benchmarks.compile_cache [--models gpt_B var_d16] [--batch 8]

GPT-B: the raster sampler (CFG 2, 256 tokens, 4 cache runs); VAR-d16: the 10-scale sampler
with its VQ-VAE decoder (CFG, top-k 900, top-p 0.96). The processes only compile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from arjax import compilation_cache


def compile_seconds(model: str, batch: int) -> float:
    from flax import nnx

    from arjax.models.raster_ar import RasterAR, gpt_config
    from benchmarks import llamagen_sampling, var_sampling
    from benchmarks.var_parity import random_params

    if model == "gpt_B":
        cfg = gpt_config("B")
        params = random_params(lambda: RasterAR(cfg, rngs=nnx.Rngs(0)), 0, 0.02)
        return llamagen_sampling.arjax_run(params, cfg, batch, warm_up=False)[1]
    return var_sampling.arjax_sample_run(*var_sampling.modules(16), batch,
                                          warm_up=False)[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["gpt_B", "var_d16"],
                        choices=["gpt_B", "var_d16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        compilation_cache.enable()
        print(json.dumps({"compile_s": compile_seconds(args.child, args.batch)}))
        return
    print(f"load {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| sampler | batch | compile s, empty cache | compile s, cached | cache MB |")
    print("|---|---|---|---|---|")
    for model in args.models:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "ARJAX_COMPILATION_CACHE": cache}
            seconds = []
            for _ in range(2):
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.compile_cache", "--child", model,
                     "--batch", str(args.batch)], env=env, check=True, capture_output=True,
                    text=True).stdout
                seconds.append(json.loads(out.strip().splitlines()[-1])["compile_s"])
            size = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache))
        print(f"| {model} | {args.batch} | {seconds[0]:.1f} | {seconds[1]:.1f} | "
              f"{size / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
