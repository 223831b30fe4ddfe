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

import functools
import re

import numpy as np

from arjax.convert import torch_io
from arjax.convert.var import vae_torch_name
from arjax.models.flowar import FlowAR, FlowARConfig
from arjax.nn.scales import block_causal_mask
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
    mask = np.where(block_causal_mask(cfg.scales), 0.0, -np.inf).astype(np.float32)
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


FLOWAR_FORMAT = torch_io.Format(FlowAR, flowar_torch_name, buffers=flowar_buffers,
                                subkeys=("model_ema", "ema", "model"))


def flowar_params_from_torch(state_dict, cfg: FlowARConfig):
    return FLOWAR_FORMAT.from_torch(state_dict, cfg)


def load_flowar(path: str, cfg: FlowARConfig):
    return FLOWAR_FORMAT.load(path, cfg)


def flowar_to_torch(params, cfg: FlowARConfig) -> dict:
    return FLOWAR_FORMAT.to_torch(params, cfg)


def kl_weights(state_dict, ema: bool = False) -> dict[str, np.ndarray]:
    """Drops training-only `loss.*` keys; with `ema`, LitEma shadows replace the weights."""
    weights = {k: v for k, v in state_dict.items()
               if not k.startswith(("loss.", "model_ema."))}
    shadows = {k[len("model_ema."):]: v for k, v in state_dict.items()
               if k.startswith("model_ema.")}
    if ema and shadows:
        weights = {k: shadows.get(k.replace(".", ""), v) for k, v in weights.items()}
    return weights


def kl_format(ema: bool = False) -> torch_io.Format:
    return torch_io.Format(KLVAE, vae_torch_name, subkeys=("model",),
                           prepare=functools.partial(kl_weights, ema=ema))


def kl_params_from_torch(state_dict, cfg: KLConfig, ema: bool = False):
    return kl_format(ema).from_torch(state_dict, cfg)


def load_kl(path: str, cfg: KLConfig, ema: bool = False):
    return kl_format(ema).load(path, cfg)


def kl_to_torch(params) -> dict:
    return kl_format().to_torch(params)
