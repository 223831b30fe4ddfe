"""Numerical parity with the official PyTorch LlamaGen (random weights through the converter).

    python -m benchmarks.llamagen_parity --official /path/to/LlamaGen [--size B]

Builds the official c2i GPT (dropouts off) and VQ-16, draws random arjax parameters, loads them
into the official modules through `arjax.convert.llamagen` (strict `load_state_dict`) and prints
the largest differences of the teacher-forced logits, the VQ codes of two 256-px images and the
decoded images. Not a test: the official repo is not part of arjax.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.convert import llamagen
from arjax.models import bind, split
from arjax.models.raster_ar import RasterAR, gpt_config
from arjax.tokenizers.vq import VQ_16, VQTokenizer
from benchmarks.var_parity import random_params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--official", required=True, help="path to a LlamaGen checkout")
    parser.add_argument("--size", default="B")
    args = parser.parse_args(argv)
    import torch

    sys.path.insert(0, args.official)
    from autoregressive.models.gpt import GPT_models
    from tokenizer.tokenizer_image.vq_model import VQ_models

    cfg = gpt_config(args.size)
    gpt_t = GPT_models[f"GPT-{args.size}"](
        vocab_size=cfg.vocab_size, block_size=cfg.seq_len, num_classes=cfg.num_classes,
        cls_token_num=1, model_type="c2i", resid_dropout_p=0.0, ffn_dropout_p=0.0,
        token_dropout_p=0.0)
    gpt_t.cls_embedding.dropout_prob = 0.0  # keeps the null-class row, drops no label
    vq_t = VQ_models["VQ-16"](codebook_size=VQ_16.codebook_size,
                              codebook_embed_dim=VQ_16.codebook_dim).eval()
    gpt_fn = lambda: RasterAR(cfg, rngs=nnx.Rngs(0))
    vq_fn = lambda: VQTokenizer(VQ_16, rngs=nnx.Rngs(0))
    gpt_p, vq_p = random_params(gpt_fn, 0, 0.2), random_params(vq_fn, 1, 0.05)
    for module, params in ((gpt_t, gpt_p), (vq_t, vq_p)):
        state = llamagen.to_torch(params)
        buffers = {k: v for k, v in module.state_dict().items() if k not in state}
        module.load_state_dict({**{k: torch.from_numpy(v) for k, v in state.items()},
                                **buffers}, strict=True)
    gpt = bind(split(nnx.eval_shape(gpt_fn))[0], gpt_p)
    vq = bind(split(nnx.eval_shape(vq_fn))[0], vq_p)

    rng = np.random.default_rng(2)
    tokens = rng.integers(0, cfg.vocab_size, (2, cfg.seq_len))
    labels = np.array([3, 1000])
    images = rng.uniform(-1, 1, (2, 256, 256, 3)).astype(np.float32)
    with torch.inference_mode():
        logits_t = gpt_t(idx=torch.from_numpy(tokens[:, :-1]),
                         cond_idx=torch.from_numpy(labels))[0].numpy()  # training path
        codes_t = vq_t.encode(torch.from_numpy(images).permute(0, 3, 1, 2))[2][2]
        codes_t = codes_t.reshape(2, -1).numpy()
        images_t = vq_t.decode_code(torch.from_numpy(codes_t), (2, 8, 16, 16))
        images_t = images_t.permute(0, 2, 3, 1).numpy()
    logits = jax.jit(lambda t, y: gpt(t, y))(jnp.asarray(tokens), jnp.asarray(labels))
    codes = np.asarray(jax.jit(vq.encode)(jnp.asarray(images)))
    decoded = np.asarray(jax.jit(vq.decode)(jnp.asarray(codes_t)))
    print(f"GPT-{args.size} teacher-forced logits max |diff|: "
          f"{np.abs(np.asarray(logits) - logits_t).max():.2e} (logit std {logits_t.std():.2f})")
    print(f"VQ-16 codes equal: {np.mean(codes == codes_t):.4f}")
    print(f"VQ-16 decoded images max |diff|: {np.abs(decoded - images_t).max():.2e}")


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
