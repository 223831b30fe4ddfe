"""Numerical parity with the official PyTorch MAR (LTH14/mar; random weights through the
converter).

    python -m benchmarks.mar_parity --official /path/to/mar [--size tiny|B] [--batch 2]

Draws random arjax MAR parameters, loads them into the official `MAR` (strict
`load_state_dict` of the converter's export; attention/projection dropout 0, eval mode) and
prints the largest differences of: the diffusion tables (respaced timestep map, betas,
posterior log variances), the trunk (forward_mae_encoder + forward_mae_decoder, which *drop*
the unknown tokens, against arjax's masked attention), the diffusion MLP's [eps ; v], the
training loss at given timesteps and noise (`training_losses`), and a whole `sample_tokens`
call with CFG (official orders and torch.randn fed arjax's orders and per-position noise in the
official call order). Not a test: the official repo is not part of arjax.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.convert.mar import mar_to_torch
from arjax.models import bind, split
from arjax.models.mar import MAR, MARConfig, diffusion, mar_config
from arjax.sampling.mar import MARSampleConfig, mask_schedule, sample_latents
from benchmarks.official_flowar import import_official, load_into
from benchmarks.var_parity import random_params

TINY = MARConfig(width=64, depth=2, heads=4, head_width=64, head_depth=2, side=4,
                 buffer_size=8, num_classes=10, dropout=0.0)


def official_mar(path: str, cfg: MARConfig, params, sampling_steps: int):
    import torch

    (mar,) = import_official(path, ("models.mar",))
    model = mar.MAR(img_size=cfg.side * 16, vae_stride=16, patch_size=1,
                    encoder_embed_dim=cfg.width, encoder_depth=cfg.depth,
                    encoder_num_heads=cfg.heads, decoder_embed_dim=cfg.width,
                    decoder_depth=cfg.depth, decoder_num_heads=cfg.heads,
                    mlp_ratio=cfg.mlp_ratio,
                    norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                    vae_embed_dim=cfg.token_dim, class_num=cfg.num_classes, attn_dropout=0.0,
                    proj_dropout=0.0, buffer_size=cfg.buffer_size, diffloss_d=cfg.head_depth,
                    diffloss_w=cfg.head_width, num_sampling_steps=str(sampling_steps))
    load_into(model, mar_to_torch(params))
    return model.eval()


def report(name: str, ours, theirs) -> None:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    diff = np.abs(ours - theirs).max()
    print(f"| {name} | {diff:.2e} | {diff / max(np.abs(theirs).max(), 1e-30):.2e} |")


def feed_randn(torch, values):
    """torch.randn / randn_like return `values` in order (the official sampler's draws)."""
    queue = iter(values)
    draw = lambda *args, **kwargs: torch.from_numpy(np.ascontiguousarray(next(queue)))
    return draw, lambda x, **kwargs: draw()


def official_draws(ranks, init, inter, cfg: MARSampleConfig, guided: bool) -> list:
    """arjax's per-position noise in the order `sample_tokens` draws it: per step, the
    initial noise of the predicted tokens (row-major, as `nonzero`), then one randn_like of the
    doubled batch per chain step (only the first half is used upstream)."""
    length = ranks.shape[1]
    m, first = mask_schedule(length, cfg.num_iter)
    draws = []
    for s in range(cfg.num_iter):
        rows, pos = np.nonzero((ranks >= first[s]) & (ranks < m[s]))
        draws.append(init[rows, pos])
        for j in range(cfg.diffusion_steps):
            step = inter[rows, pos, j]
            draws.append(np.concatenate([step, step]) if guided else step)
    return draws


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="checkout of LTH14/mar")
    parser.add_argument("--size", default="tiny", choices=("tiny", "B"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--num-iter", type=int, default=8)
    parser.add_argument("--diffusion-steps", type=int, default=10)
    args = parser.parse_args(argv)
    cfg = TINY if args.size == "tiny" else dataclasses.replace(mar_config("B"), dropout=0.0)
    module_fn = lambda: MAR(cfg, rngs=nnx.Rngs(0))
    params = random_params(module_fn, 0, 0.05)
    params = jax.tree_util.tree_map_with_path(  # LayerNorm scales (the only `scale`s) near 1
        lambda p, x: x + 1.0 if jax.tree_util.keystr(p).endswith("['scale']") else x, params)
    graphdef = split(nnx.eval_shape(module_fn))[0]
    model = bind(graphdef, params)
    official = official_mar(args.official, cfg, params, args.diffusion_steps)
    rng = np.random.default_rng(0)
    b, length, c = args.batch, cfg.seq_len, cfg.token_dim
    print(f"MAR {args.size}: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f} M "
          "parameters, float32, CPU")
    print("| quantity | max abs diff | relative to max abs |")
    print("|---|---|---|")

    gen = official.diffloss.gen_diffusion
    ours = diffusion("cosine", args.diffusion_steps)
    report("respaced timestep map", ours.timesteps, gen.timestep_map)
    report("respaced betas", ours.betas, gen.betas)
    report("posterior log variance (clipped)", ours.tables["post_log_var"],
           gen.posterior_log_variance_clipped)

    tokens = rng.normal(size=(b, length, c)).astype(np.float32)
    masked = np.zeros((b, length), bool)
    for row in masked:
        row[rng.permutation(length)[: length // 2]] = True
    labels = rng.integers(0, cfg.num_classes, b)
    with torch.no_grad():
        t_tok, t_mask = torch.from_numpy(tokens), torch.from_numpy(masked.astype(np.float32))
        emb = official.class_emb(torch.from_numpy(labels))
        z_theirs = official.forward_mae_decoder(
            official.forward_mae_encoder(t_tok, t_mask, emb), t_mask).numpy()
    z_ours = jax.jit(lambda p: bind(graphdef, p)(jnp.asarray(tokens), jnp.asarray(~masked),
                                                  bind(graphdef, p).conditioning(
                                                      jnp.asarray(labels))))(params)
    report("trunk z (half the tokens unknown)", z_ours, z_theirs)

    n = 64
    x = rng.normal(size=(n, c)).astype(np.float32)
    t = rng.integers(0, 1000, n)
    zc = rng.normal(size=(n, cfg.width)).astype(np.float32)
    with torch.no_grad():
        out_theirs = official.diffloss.net(torch.from_numpy(x), torch.from_numpy(t),
                                           torch.from_numpy(zc)).numpy()
    out_ours = model.diffloss(jnp.asarray(x), jnp.asarray(t), jnp.asarray(zc))
    report("diffusion MLP eps", out_ours[:, :c], out_theirs[:, :c])
    report("diffusion MLP v", out_ours[:, c:], out_theirs[:, c:])
    noise = rng.normal(size=(n, c)).astype(np.float32)
    with torch.no_grad():
        loss_theirs = official.diffloss.train_diffusion.training_losses(
            official.diffloss.net, torch.from_numpy(x), torch.from_numpy(t),
            dict(c=torch.from_numpy(zc)), noise=torch.from_numpy(noise))["loss"].numpy()
    loss_ours = diffusion().loss_at(functools.partial(model.diffloss, z=jnp.asarray(zc)),
                                    jnp.asarray(x), jnp.asarray(t), jnp.asarray(noise))
    report("training loss per token (MSE + VLB)", loss_ours, loss_theirs)

    sample_cfg = MARSampleConfig(num_iter=args.num_iter, cfg=3.0, cfg_schedule="linear",
                                 temperature=0.9, diffusion_steps=args.diffusion_steps)
    ranks = np.stack([rng.permutation(length) for _ in range(b)])
    init = rng.normal(size=(b, length, c)).astype(np.float32)
    inter = rng.normal(size=(b, length, args.diffusion_steps, c)).astype(np.float32)
    ours_latents = jax.jit(lambda p: sample_latents(
        graphdef, p, jax.random.key(0), jnp.asarray(labels), sample_cfg, (init, inter),
        jnp.asarray(ranks))[0])(params)
    randn, randn_like = feed_randn(torch, official_draws(ranks, init, inter, sample_cfg, True))
    official.sample_orders = lambda bsz: torch.from_numpy(np.argsort(ranks, axis=-1))
    saved = torch.randn, torch.randn_like
    torch.randn, torch.randn_like = randn, randn_like
    try:
        with torch.no_grad():
            theirs = official.sample_tokens(b, num_iter=args.num_iter, cfg=3.0,
                                            cfg_schedule="linear",
                                            labels=torch.from_numpy(labels), temperature=0.9)
    finally:
        torch.randn, torch.randn_like = saved
    theirs = theirs.numpy().transpose(0, 2, 3, 1)  # [B, C, h, w] -> [B, h, w, C]
    report(f"sample_tokens ({args.num_iter} steps, {args.diffusion_steps} diffusion steps, "
           "cfg 3 linear, tau 0.9)", ours_latents, theirs)
    print(f"(sample magnitudes up to {np.abs(theirs).max():.3g}; "
          f"{math.prod(theirs.shape)} values)")


if __name__ == "__main__":
    main()
