"""Numerical parity with the official PyTorch VAR (random weights through the converter).

    python -m benchmarks.var_parity --official /path/to/VAR [--depth 4]

Builds the official VAR-d{depth} and VQVAE (`build_vae_var`, needs `huggingface_hub`), draws
random arjax parameters, loads them into the official modules through `arjax.convert.var`
(strict `load_state_dict`), and prints the largest differences of: teacher-forced logits
(`VAR.forward`, cond dropout off), the quantiser's per-scale codes and teacher-forcing input
(`img_to_idxBl`, `idxBl_to_var_input`), and the decoded image (`idxBl_to_img`). Not a test:
the official repo is not part of arjax.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.convert import torch_io
from arjax.convert import var as var_convert
from arjax.models import bind, split
from arjax.models.var import VAR, var_config
from arjax.tokenizers.msvq import VAR_VAE, MultiScaleVQVAE


def random_params(module_fn, seed: int, scale: float):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (rng.normal(size=a.shape) * scale).astype(np.float32),
                        torch_io.abstract_params(module_fn))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--official", required=True, help="path to a VAR checkout")
    parser.add_argument("--depth", type=int, default=4)
    args = parser.parse_args(argv)
    import torch

    sys.path.insert(0, args.official)
    from models import build_vae_var

    cfg = var_config(args.depth)
    vae_t, var_t = build_vae_var(device="cpu", depth=args.depth, flash_if_available=False,
                                 fused_if_available=False)
    var_t.cond_drop_rate = 0.0
    var_t.eval(), vae_t.eval()  # no drop path
    vae_fn = lambda: MultiScaleVQVAE(VAR_VAE, rngs=nnx.Rngs(0))
    var_fn = lambda: VAR(cfg, rngs=nnx.Rngs(0))
    vae_p, var_p = random_params(vae_fn, 0, 0.05), random_params(var_fn, 1, 0.05)
    for module, state in ((vae_t, var_convert.vae_to_torch(vae_p)),
                          (var_t, var_convert.var_to_torch(var_p))):
        buffers = {k: v for k, v in module.state_dict().items() if k not in state}
        module.load_state_dict({**{k: torch.from_numpy(v) for k, v in state.items()},
                                **buffers}, strict=True)
    vae = bind(split(nnx.eval_shape(vae_fn))[0], vae_p)
    var = bind(split(nnx.eval_shape(var_fn))[0], var_p)

    images = np.random.default_rng(2).uniform(-1, 1, (2, 256, 256, 3)).astype(np.float32)
    labels = np.array([3, 1000])
    with torch.inference_mode():
        x_t = torch.from_numpy(images).permute(0, 3, 1, 2)
        codes_t = vae_t.img_to_idxBl(x_t)
        inputs_t = vae_t.quantize.idxBl_to_var_input(codes_t)
        logits_t = var_t(torch.from_numpy(labels), inputs_t).numpy()
        image_t = vae_t.idxBl_to_img(codes_t, same_shape=True, last_one=True)
        image_t = image_t.permute(0, 2, 3, 1).numpy()
    codes = jax.jit(lambda x: vae.encode(x))(jnp.asarray(images))
    same = [float(np.mean(np.asarray(c) == ct.numpy())) for c, ct in zip(codes, codes_t)]
    codes_j = [jnp.asarray(ct.numpy()) for ct in codes_t]  # compare downstream on equal codes
    inputs = vae.quantize.teacher_inputs(codes_j, 16)
    logits = var(jnp.asarray(labels), inputs)
    image = vae.decode(codes_j)
    print(f"codes equal per scale: {[round(s, 4) for s in same]}")
    print(f"teacher input max |diff|: {np.abs(np.asarray(inputs) - inputs_t.numpy()).max():.2e}")
    print(f"VAR-d{args.depth} logits max |diff|: {np.abs(np.asarray(logits) - logits_t).max():.2e}"
          f" (logits std {logits_t.std():.2f})")
    print(f"decoded image max |diff|: {np.abs(np.asarray(image) - image_t).max():.2e}")


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
