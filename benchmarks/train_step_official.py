"""One AdamW train step of GPT-B (batch 4 x 256 tokens, float32): arjax vs the official
LlamaGen model + cross-entropy + torch AdamW, same process, interleaved, against the floor.

    python -m benchmarks.train_step_official --official /path/to/LlamaGen [--rounds 5]
        [--steps 2] [--batch 4] [--compete] [--torch-threads N]

arjax runs the experiment's own step (`experiments.llamagen_imagenet.plan_stage`: model,
loss, AdamW with the preset's betas / weight decay / gradient clip), jitted with donation;
the official side runs `GPT_models["GPT-B"]` in train mode (dropouts as the preset: 0.1),
`F.cross_entropy`, `clip_grad_norm_(1.0)` and `torch.optim.AdamW(lr=1e-4, betas=(0.9, 0.95),
weight_decay=0.05)` (fused=False, foreach as torch chooses), as its `train_c2i.py`. The
compute floor counts 6 FLOPs per matmul weight per token (forward + backward) plus attention.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

from benchmarks import harness
from benchmarks.train_step_policies import random_batch


def arjax_step(batch: int):
    from arjax import sharding
    from arjax.experiment.pipeline import stage_program
    from arjax.plan import abstract_step
    from experiments import llamagen_imagenet as exp

    stage = exp.plan_stage(exp.PRESETS["imagenet256_B"])
    mesh = sharding.make_mesh((("data", 1),), jax.devices()[:1])
    step, state_spec, batch_spec = abstract_step(stage, mesh, sharding.DEFAULT_RULES, batch)
    t0 = time.perf_counter()
    compiled = step.lower(state_spec, batch_spec).compile()
    compile_s = time.perf_counter() - t0
    state = jax.jit(stage_program(stage.module_fn, stage.loss_fn, stage.stage)[1])()
    data = random_batch(stage.example, batch, stage.model_cfg.vocab_size)
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], data)
        jax.block_until_ready(metrics)
    run()
    return run, stage, compile_s, holder


def official_step(repo: str, batch: int, cfg):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, repo)
    from autoregressive.models.gpt import GPT_models

    model = GPT_models["GPT-B"](vocab_size=cfg.vocab_size, block_size=cfg.seq_len,
                                num_classes=cfg.num_classes, cls_token_num=1,
                                model_type="c2i").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=gen)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=gen)

    def run():
        logits, _ = model(idx=codes[:, :-1], cond_idx=labels, targets=None)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    run()
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--official", required=True, help="path to a LlamaGen checkout")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    harness.add_arguments(parser, rounds=5)
    args = parser.parse_args(argv)
    harness.apply(args)
    ours, stage, compile_s, holder = arjax_step(args.batch)
    cfg = stage.model_cfg
    params = holder["state"].params
    machine = harness.calibrate(4 * harness.matmul_weights(params))
    theirs = official_step(args.official, args.batch, cfg)
    repeat = lambda fn: (lambda: [fn() for _ in range(args.steps)])
    with harness.compete(args.compete):
        times = harness.interleave({"arjax": repeat(ours), "official": repeat(theirs)},
                                   args.rounds)
        busy = harness.load()
    tokens = args.batch * cfg.seq_len
    flops = 3 * (2 * harness.matmul_weights(params) * tokens
                 + 4 * cfg.depth * cfg.dim * cfg.seq_len * tokens)
    floor_s, bound = harness.floor(0, flops, machine)
    per_step = {k: [t / args.steps for t in v] for k, v in times.items()}
    line = [f"GPT-B train step, batch {args.batch} x {cfg.seq_len}{harness.condition(args)}: "
            f"floor {floor_s:.2f} s ({bound}-bound, {flops / 1e12:.2f} TFLOP)",
            *harness.columns(per_step, floor_s, f" (compile {compile_s:.0f} s)")]
    print(" | ".join(line) + f" | load {busy}", flush=True)


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
