"""Official FlowAR (`FlowAR-{S,L,H}.pth`) and MAR KL-16 (`kl16.ckpt`) checkpoints <-> arjax.

FlowAR files are plain state_dicts of the EMA weights (training checkpoints: MAR's dict, whose
`model_ema` is taken). Renames: the trunk's AdaLN and the head's final modulation are
`nn.Sequential(SiLU, Linear)` upstream (`ada_lin.1.*`, `adaLN_modulation.1.*`), the timestep
MLP is `time_embed.mlp.{0,2}` (`mlp_0`, `mlp_2` here). The buffers `mask` and `*.rope.freqs`
are recomputed (and exported, so the official module loads an export strictly).
kl16.ckpt holds the VAE under "model"; LDM-style files may add `loss.*` (training only,
dropped) and LitEma shadows `model_ema.<name without dots>`. The raw weights are loaded by
default, as the official MAR/FlowAR loaders do; `ema=True` loads the shadows instead.
The VAE's module names are VAR's (`vae_torch_name`).
"""

from __future__ import annotations

import re

import numpy as np
from flax import nnx

from arjax.convert import torch_io
from arjax.convert.var import vae_torch_name
from arjax.models.flowar import FlowAR, FlowARConfig
from arjax.tokenizers.kl import KLVAE, KLConfig

_RENAMES = ((r"((?:encoder|decoder)_blocks\.\d+\.ada_lin)\.", r"\1.1."),
            (r"adaLN_modulation\.", "adaLN_modulation.1."),
            (r"time_embed\.mlp_(\d)\.", r"time_embed.mlp.\1."))


def flowar_torch_name(path: str, shape: tuple[int, ...]) -> tuple[str, torch_io.Transform]:
    key, transform = torch_io.default_torch_name(path, shape)
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key, transform


def flowar_buffers(cfg: FlowARConfig) -> dict[str, np.ndarray]:
    """The official module's buffers: the additive block-causal mask and RoPE frequencies."""
    levels = np.repeat(np.arange(len(cfg.scales)), [n * n for n in cfg.scales])
    mask = np.where(levels[:, None] >= levels[None, :], 0.0, -np.inf).astype(np.float32)
    freqs = lambda head_dim: (1.0 / 10000 ** (np.arange(0, head_dim // 2, 2)
                                              .astype(np.float32) / (head_dim // 2)))
    out = {"mask": mask[None, None]}
    for stack in ("encoder_blocks", "decoder_blocks"):
        for i in range(cfg.depth):
            out[f"{stack}.{i}.attn.rope.freqs"] = freqs(cfg.width // cfg.heads)
    for j in range(cfg.head_depth):
        for attn in ("attn", "crossattn") if cfg.cross else ("attn",):
            out[f"flownet.res_blocks.{j}.{attn}.rope.freqs"] = freqs(64)
    return out


def flowar_params_from_torch(state_dict, cfg: FlowARConfig):
    abstract = torch_io.abstract_params(lambda: FlowAR(cfg, rngs=nnx.Rngs(0)))
    return torch_io.convert(state_dict, abstract, flowar_torch_name,
                            ignore=tuple(flowar_buffers(cfg)))


def load_flowar(path: str, cfg: FlowARConfig):
    state_dict = torch_io.load_state_dict(path, subkeys=("model_ema", "ema", "model"))
    return flowar_params_from_torch(state_dict, cfg)


def flowar_to_torch(params, cfg: FlowARConfig) -> dict:
    return {**torch_io.export(params, flowar_torch_name), **flowar_buffers(cfg)}


def kl_weights(state_dict, ema: bool = False) -> dict[str, np.ndarray]:
    """Drops training-only `loss.*` keys; with `ema`, LitEma shadows replace the weights."""
    weights = {k: v for k, v in state_dict.items()
               if not k.startswith(("loss.", "model_ema."))}
    shadows = {k[len("model_ema."):]: v for k, v in state_dict.items()
               if k.startswith("model_ema.")}
    if ema and shadows:
        weights = {k: shadows.get(k.replace(".", ""), v) for k, v in weights.items()}
    return weights


def kl_params_from_torch(state_dict, cfg: KLConfig, ema: bool = False):
    abstract = torch_io.abstract_params(lambda: KLVAE(cfg, rngs=nnx.Rngs(0)))
    return torch_io.convert(kl_weights(state_dict, ema), abstract, vae_torch_name)


def load_kl(path: str, cfg: KLConfig, ema: bool = False):
    return kl_params_from_torch(torch_io.load_state_dict(path, subkeys=("model",)), cfg, ema)


def kl_to_torch(params) -> dict:
    return torch_io.export(params, vae_torch_name)
