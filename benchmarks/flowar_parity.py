"""Numerical parity with the official PyTorch FlowAR and MAR KL-16 (random weights through the
converter).

    python -m benchmarks.flowar_parity --official /path/to/FlowAR [--size S]

Draws random arjax FlowAR-{size} and KL-16 parameters, loads them into the official modules
(strict `load_state_dict` of the converter's export) and prints the largest differences of:
the trunk inputs (FlowAR.forward's interpolation chain), the teacher-forced trunk vectors
(forward_mae_encoder/decoder in train mode with dropout 0, as §9 of the spec prescribes), the
flow head's velocity at every scale, a whole `sample_tokens` call (cfg 4.3, guidance 0.9, 25
steps; torch.randn is fed arjax's noise) and KL-16 moments / decoded images. Not a test: the
official repo is not part of arjax.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.models import bind, split
from arjax.models.flowar import FlowAR, flowar_config, teacher_inputs
from arjax.nn.scales import scale_bounds
from arjax.sampling.flowar import FlowSampleConfig, sample_latents
from arjax.tokenizers.kl import KL_16, KLVAE
from benchmarks.official_flowar import official_flowar, official_kl16
from benchmarks.var_parity import random_params


def with_unit_norms(params):
    """Norm weights around 1 (random ones near 0 would silence whole blocks)."""
    def fix(path, x):
        name = jax.tree_util.keystr(path)
        return x + 1.0 if "norm" in name and "'weight'" in name else x
    return jax.tree_util.tree_map_with_path(fix, params)


def official_noise(key, scales, batch: int, dim: int) -> list[np.ndarray]:
    """The noise arjax's sampler draws at each scale ([cond; null] halves)."""
    out = []
    for k, n in enumerate(scales):
        k_cond, k_null = jax.random.split(jax.random.fold_in(key, k))
        out.append(np.concatenate([np.asarray(jax.random.normal(kk, (batch, n * n, dim)))
                                   for kk in (k_cond, k_null)]))
    return out


def maxdiff(a, b) -> str:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return f"{np.abs(a - b).max():.2e} (std {b.std():.2f})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--official", required=True, help="path to a FlowAR checkout")
    parser.add_argument("--size", default="S", choices=["S", "L", "H"])
    args = parser.parse_args(argv)
    import torch
    import torch.nn.functional as F

    cfg = flowar_config(args.size, dropout=0.0)
    model_fn = lambda: FlowAR(cfg, rngs=nnx.Rngs(0))
    params = with_unit_norms(random_params(model_fn, 0, 0.02))
    model = bind(split(nnx.eval_shape(model_fn))[0], params)
    official = official_flowar(args.official, args.size, params, cfg)

    rng = np.random.default_rng(1)
    latents = rng.normal(size=(2, 16, 16, 16)).astype(np.float32)
    labels = np.array([3, 1000])
    with torch.no_grad():
        x = torch.from_numpy(latents).permute(0, 3, 1, 2)
        levels = [F.interpolate(x, (n, n), mode="area") for n in cfg.scales[:-1]] + [x]
        inputs_t = torch.cat([F.interpolate(F.interpolate(levels[k], (16, 16), mode="bicubic"),
                                            (n, n), mode="area").flatten(2).transpose(1, 2)
                              for k, n in enumerate(cfg.scales[1:])], dim=1)
        official.train()  # the full-sequence path; every dropout is 0
        cls = official.class_emb(torch.from_numpy(labels))
        seq = torch.cat([cls[:, None], official.z_proj(inputs_t)], dim=1)
        z_t = official.forward_mae_decoder(official.forward_mae_encoder(seq, cls, official.mask),
                                           cls, official.mask)
        official.eval()
        xt = rng.normal(size=(2, cfg.seq_len, 16)).astype(np.float32)
        t = np.array([0.73, 0.2], np.float32)
        v_t = [official.flownet(torch.from_numpy(xt[:, b:e]), torch.from_numpy(t), z_t[:, b:e])
               for b, e in scale_bounds(cfg.scales)]
    _, inputs = teacher_inputs(jnp.asarray(latents), cfg.scales)
    z = model(jnp.asarray(labels), inputs)
    print(f"FlowAR-{args.size} trunk inputs max |diff|: {maxdiff(inputs, inputs_t)}")
    print(f"FlowAR-{args.size} trunk vectors max |diff|: {maxdiff(z, z_t)}")
    for k, ((b, e), rope) in enumerate(zip(scale_bounds(cfg.scales), model.head_ropes)):
        v = model.flownet(jnp.asarray(xt[:, b:e]), jnp.asarray(t),
                          jnp.asarray(z_t[:, b:e].numpy()), jnp.asarray(rope))
        print(f"  flow head velocity, scale {cfg.scales[k]}: {maxdiff(v, v_t[k])}")

    scfg = FlowSampleConfig(num_steps=25, cfg=4.3, guidance=0.9)
    key, sample_labels = jax.random.key(3), np.array([207, 88])
    noise = official_noise(key, cfg.scales, 2, 16)
    randn = torch.randn
    torch.randn = lambda *a, **kw: torch.from_numpy(noise.pop(0))
    try:
        with torch.no_grad():
            tokens_t = official.sample_tokens(num_steps=25, guidance=0.9, cfg=4.3,
                                              labels=torch.from_numpy(sample_labels))
    finally:
        torch.randn = randn
    ours, _ = sample_latents(split(model)[0], params, key, jnp.asarray(sample_labels), scfg)
    print(f"sample_tokens (cfg 4.3, 25 steps) max |diff|: "
          f"{maxdiff(ours, tokens_t.permute(0, 2, 3, 1).numpy())}  (float32 here, float64 "
          "ODE upstream)")

    vae_fn = lambda: KLVAE(KL_16, rngs=nnx.Rngs(0))
    vae_params = with_unit_norms(random_params(vae_fn, 2, 0.02))
    vae = bind(split(nnx.eval_shape(vae_fn))[0], vae_params)
    vae_t = official_kl16(args.official, vae_params)
    images = rng.uniform(-1, 1, (1, 256, 256, 3)).astype(np.float32)
    with torch.no_grad():
        moments_t = vae_t.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).parameters
        z16 = moments_t[:, :16]
        decoded_t = vae_t.decode(z16).permute(0, 2, 3, 1).numpy()
    moments = jax.jit(vae.moments)(jnp.asarray(images))
    decoded = jax.jit(vae.decode_raw)(jnp.asarray(z16.permute(0, 2, 3, 1).numpy()))
    print(f"KL-16 moments max |diff|: {maxdiff(moments, moments_t.permute(0, 2, 3, 1).numpy())}")
    print(f"KL-16 decoded image max |diff|: {maxdiff(decoded, decoded_t)}")


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
