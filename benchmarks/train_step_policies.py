"""Train-step time of the ImageNet generators under each precision/remat policy, on this
machine: GPT-B (LlamaGen, batch 4 x 256 tokens), VAR-d16 (batch 4 x 680 tokens) and FlowAR-S
(batch 4, 16x16x16 latents), each with float32 or bfloat16 compute, remat none or full, and
the blocks unrolled (`loop`) or scanned (`scan`, `model.scan_layers`).

    python -m benchmarks.train_step_policies [--models gpt,var,flowar] [--rounds 3]
        [--steps 2] [--batch 4] [--policies float32:none:loop,float32:none:scan,...]

The step is the experiments' own (`plan_stage`: model, loss, optimizer, EMA as the preset
says), jitted with donation on one device, on random codes / moments; compilation is timed
separately. The policies of one model share one train state and run interleaved: every round
times `--steps` steps of each policy in turn, and the table gives the median and the spread
(min-max) of the per-step time over the rounds, with the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

POLICIES = "float32:none:loop,float32:full:loop,bfloat16:none:loop,bfloat16:full:loop," \
    "float32:none:scan,bfloat16:full:scan"  # dtype:remat:blocks
PRESETS = {"gpt": ("llamagen_imagenet", "imagenet256_B"),
           "var": ("var_imagenet", "imagenet256_d16"),
           "flowar": ("flowar_imagenet", "imagenet256_S")}


def random_batch(example: dict, batch: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for name, spec in example.items():
        shape = (batch, *spec.shape)
        if name == "label":
            out[name] = jnp.asarray(rng.integers(0, 1000, shape), spec.dtype)
        elif jnp.issubdtype(spec.dtype, jnp.integer):
            out[name] = jnp.asarray(rng.integers(0, vocab, shape), spec.dtype)
        else:
            out[name] = jnp.asarray(rng.normal(size=shape), spec.dtype)
    return out


def compiled_step(stage, batch: int):
    """(the stage's train step compiled for one device and `batch` rows, compile seconds)."""
    from arjax import sharding
    from arjax.plan import abstract_step

    mesh = sharding.make_mesh((("data", 1),), jax.devices()[:1])
    step, state_spec, batch_spec = abstract_step(stage, mesh, sharding.DEFAULT_RULES, batch)
    t0 = time.perf_counter()
    compiled = step.lower(state_spec, batch_spec).compile()
    return compiled, time.perf_counter() - t0


def initial_inputs(stage, batch: int):
    """(a freshly initialised train state, a random batch of `batch` rows) for the stage."""
    from arjax.experiment.pipeline import stage_program

    state = jax.jit(stage_program(stage.module_fn, stage.loss_fn, stage.stage)[1])()
    vocab = getattr(stage.model_cfg, "vocab_size", 2)
    return state, random_batch(stage.example, batch, vocab)


def time_model(name: str, batch: int, rounds: int, steps: int,
               policies: list[tuple[str, str, str]]) -> list[dict]:
    import importlib

    from arjax import config as cfglib

    module, preset = PRESETS[name]
    exp = importlib.import_module(f"experiments.{module}")
    steps_by_policy, compile_s = {}, {}
    base = exp.PRESETS[preset]
    for dtype, remat, blocks in policies:
        cfg = cfglib.override(base, [f"model.dtype={dtype}", f"model.remat={remat}",
                                     f"model.scan_layers={blocks == 'scan'}"])
        policy = (dtype, remat, blocks)
        steps_by_policy[policy], compile_s[policy] = compiled_step(exp.plan_stage(cfg), batch)
    state, data = initial_inputs(exp.plan_stage(base), batch)
    times = {p: [] for p in policies}
    for policy in policies:  # warm-up: first call of each executable
        state, metrics = steps_by_policy[policy](state, data)
    jax.block_until_ready(metrics)
    for _ in range(rounds):
        for policy in policies:
            t0 = time.perf_counter()
            for _ in range(steps):
                state, metrics = steps_by_policy[policy](state, data)
            jax.block_until_ready(metrics)
            times[policy].append((time.perf_counter() - t0) / steps)
    return [{"model": f"{module}:{preset}", "dtype": p[0], "remat": p[1], "blocks": p[2],
             "median_s": statistics.median(times[p]), "min_s": min(times[p]),
             "max_s": max(times[p]), "compile_s": compile_s[p], "rounds": rounds,
             "steps": steps} for p in policies]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt,var,flowar")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--policies", default=POLICIES, help="dtype:remat:loop|scan,...")
    args = parser.parse_args(argv)
    policies = [tuple(p.split(":")) for p in args.policies.split(",")]
    print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores, load before "
          f"{os.getloadavg()}", flush=True)
    print("| model | dtype | remat | blocks | step s (median) | spread | compile s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for row in time_model(name, args.batch, args.rounds, args.steps, policies):
            print(f"| {row['model']} | {row['dtype']} | {row['remat']} | {row['blocks']} "
                  f"| {row['median_s']:.2f} "
                  f"| {row['min_s']:.2f}-{row['max_s']:.2f} | {row['compile_s']:.0f} |",
                  flush=True)
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
