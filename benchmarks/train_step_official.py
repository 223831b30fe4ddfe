"""One AdamW train step, float32, batch 4: arjax vs the official model + loss + torch AdamW,
same process, interleaved, against the floor. GPT-B (256 tokens) against LlamaGen, VAR-d16
(680 tokens) against VAR, FlowAR-S (341 tokens) against FlowAR.

    python -m benchmarks.train_step_official --official /path/to/LlamaGen [--model gpt_B]
    python -m benchmarks.train_step_official --official /path/to/VAR --model var_d16
    python -m benchmarks.train_step_official --official /path/to/FlowAR --model flowar_S
        [--rounds 5] [--steps 2] [--batch 4] [--compete] [--torch-threads N] [--xla-ops]

arjax runs the experiment's own step (`plan_stage` of `llamagen_imagenet` / `var_imagenet`:
model, loss, AdamW with the preset's betas / weight decay / gradient clip), jitted with
donation. GPT-B: the official `GPT_models["GPT-B"]` in train mode (dropouts as the preset:
0.1), `F.cross_entropy`, `clip_grad_norm_(1.0)` and `torch.optim.AdamW(lr=1e-4, betas=(0.9,
0.95), weight_decay=0.05)`, as its `train_c2i.py`. VAR-d16: `build_vae_var` as its `train.py`
(drop path 0.1 x 16 / 24, label drop 0.1), the teacher-forcing input from the codes
(`idxBl_to_var_input`: arjax's loss rebuilds it too), the per-token cross-entropy averaged with
equal weights, `clip_grad_norm_(2.0)`, AdamW betas (0.9, 0.95), weight decay 0.05 (the VQ
encoder that makes the codes is outside both steps: arjax trains on cached codes).
FlowAR-S: `flowar_small` in train mode (label drop 0.1, attention and projection dropout 0.1
as the preset) on scaled KL-16 latents, its own flow-matching loss (`forward`), grad clip 3.0,
AdamW betas (0.9, 0.95), weight decay 0.02, then the EMA update (rate 0.9999) as its training
loop does after each step (arjax's preset keeps the EMA too; arjax samples the latents from
cached posterior moments inside its step, the official code gets them from the VAE outside).
All: fused=False, foreach as torch chooses. The compute floor counts 6 FLOPs per matmul
weight per token (forward + backward) plus attention. `--xla-ops` also times arjax's step
compiled with its CPU kernels off (XLA's own attention ops), interleaved.
"""

from __future__ import annotations

import argparse
import sys

import jax

from benchmarks import harness
from benchmarks.train_step_policies import PRESETS, compiled_step, initial_inputs

MODELS = {"gpt_B": PRESETS["gpt"], "var_d16": PRESETS["var"],  # those with an official step
          "flowar_S": PRESETS["flowar"]}


def arjax_step(model: str, batch: int, kernels: bool = True):
    """(step run, stage, compile seconds, {"state"}); `kernels=False`: compiled with arjax's
    CPU kernels off."""
    import importlib

    module, preset = MODELS[model]
    exp = importlib.import_module(f"experiments.{module}")
    stage = exp.plan_stage(exp.PRESETS[preset])
    with harness.kernels(kernels):
        compiled, compile_s = compiled_step(stage, batch)
    state, data = initial_inputs(stage, batch)
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], data)
        jax.block_until_ready(metrics)
    run()
    return run, stage, compile_s, holder


def official_gpt(repo: str, batch: int, cfg, args):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, repo)
    from autoregressive.models.gpt import GPT_models

    model = GPT_models["GPT-B"](vocab_size=cfg.vocab_size, block_size=cfg.seq_len,
                                num_classes=cfg.num_classes, cls_token_num=1,
                                model_type="c2i").train()
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=gen)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=gen)
    forward = harness.official_module(model, args)

    def loss():
        logits, _ = forward(idx=codes[:, :-1], cond_idx=labels, targets=None)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
    return model, loss, 1.0, 0.05


def official_var(repo: str, batch: int, cfg, args):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, repo)
    from models import build_vae_var

    vae, model = build_vae_var(device="cpu", depth=cfg.depth, shared_aln=False,
                               flash_if_available=False, fused_if_available=False)
    model.train()
    gen = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, cfg.vocab_size, (batch, pn * pn), generator=gen)
             for pn in cfg.patch_nums]
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=gen)
    targets = torch.cat(codes, 1)
    forward = harness.official_module(model, args, mode="reduce-overhead")  # train.py --tfast=1

    def loss():
        logits = forward(labels, vae.quantize.idxBl_to_var_input(codes))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return model, loss, 2.0, 0.05


def official_flowar(repo: str, batch: int, cfg, args):
    import torch

    from benchmarks.official_flowar import import_official

    flowar, _ = import_official(repo)
    model = flowar.flowar_small(diffloss_d=cfg.head_depth, diffloss_w=cfg.head_width,
                                label_drop_prob=cfg.label_drop, attn_dropout=cfg.dropout,
                                proj_dropout=cfg.dropout).train()
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, cfg.token_dim, cfg.side, cfg.side, generator=gen)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=gen)
    forward = harness.official_module(model, args, mode="default")
    return model, lambda: forward(latents, labels), 3.0, 0.02


OFFICIAL = {"gpt_B": official_gpt, "var_d16": official_var, "flowar_S": official_flowar}


def official_step(model: str, repo: str, batch: int, cfg, args, ema_rate: float | None):
    """One step of the official recipe; with `ema_rate`, its per-parameter EMA update after
    the optimizer (MAR's and FlowAR's training loop)."""
    import torch

    module, loss, clip, weight_decay = OFFICIAL[model](repo, batch, cfg, args)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.95),
                            weight_decay=weight_decay)
    params = list(module.parameters())
    ema = [p.detach().clone() for p in params] if ema_rate else []

    def run():
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        with torch.no_grad():
            for average, p in zip(ema, params):
                average.mul_(ema_rate).add_(p, alpha=1 - ema_rate)
    run()
    return run


def flops_per_step(model: str, cfg, params, batch: int) -> float:
    """Forward + backward (3x the forward) matmul and attention FLOPs of one step."""
    tokens = batch * cfg.seq_len
    if model == "flowar_S":  # trunk (its AdaLN is per sample) and flow head, both per token
        head = harness.matmul_weights(params["flownet"])
        trunk = harness.matmul_weights(params, skip=("embedding", "ada_lin", "flownet"))
        attention = (4 * 2 * cfg.depth * cfg.width * cfg.seq_len ** 2
                     + 4 * cfg.head_depth * cfg.head_width * sum(n ** 4 for n in cfg.scales))
        return 3 * (2 * (trunk + head) * tokens + attention * batch)
    per_token = harness.matmul_weights(params, skip=("embedding", "ada_lin"))  # VAR's AdaLN:
    return 3 * (2 * per_token * tokens  # once per sample
                + 4 * cfg.depth * cfg.dim * cfg.seq_len * tokens)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--official", required=True,
                        help="path to a LlamaGen (gpt_B), VAR (var_d16) or FlowAR (flowar_S) "
                             "checkout")
    parser.add_argument("--model", default="gpt_B", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    harness.add_arguments(parser, rounds=5)
    args = parser.parse_args(argv)
    harness.apply(args)
    ours, stage, compile_s, holder = arjax_step(args.model, args.batch)
    cfg = stage.model_cfg
    params = holder["state"].params
    machine = harness.calibrate(4 * harness.matmul_weights(params))
    ema_rate = stage.stage.ema_decay or None
    theirs = official_step(args.model, args.official, args.batch, cfg, args, ema_rate)
    repeat = lambda fn: (lambda: [fn() for _ in range(args.steps)])
    runs = {"arjax": repeat(ours), "official": repeat(theirs)}
    if args.xla_ops:
        xla_run, _, xla_compile_s, _ = arjax_step(args.model, args.batch, kernels=False)
        runs["arjax, XLA ops"] = repeat(xla_run)
    with harness.compete(args.compete):
        times = harness.interleave(runs, args.rounds)
        busy = harness.load()
    flops = flops_per_step(args.model, cfg, params, args.batch)
    floor_s, bound = harness.floor(0, flops, machine)
    per_step = {k: [t / args.steps for t in v] for k, v in times.items()}
    line = [f"{args.model} train step, batch {args.batch} x {cfg.seq_len}"
            f"{harness.condition(args)}: "
            f"floor {floor_s:.2f} s ({bound}-bound, {flops / 1e12:.2f} TFLOP)",
            *harness.columns(per_step, floor_s, f" (compile {compile_s:.0f} s)")]
    if args.xla_ops:
        line.append(harness.variant(per_step, "arjax, XLA ops", xla_compile_s))
    print(" | ".join(line) + f" | load {busy}", flush=True)


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
