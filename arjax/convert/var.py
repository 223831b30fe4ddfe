"""Official VAR checkpoints (`var_d{16,20,24,30,36}.pth`, `vae_ch160v4096z32.pth`) <-> arjax.

Both are plain state_dicts (`torch.load(weights_only=True)` works). arjax module paths mirror
them except: AdaLN projections are `nn.Sequential(SiLU, Linear)` upstream (`ada_lin.1.*`), and
the tokenizer's res blocks are `block.{j}` upstream (`res.{j}` here). Buffers that arjax
recomputes are ignored: `lvl_1L`, `attn_bias_for_masking`, `*.zero_k_bias`,
`quantize.ema_vocab_hit_SV`.
"""

from __future__ import annotations

import re

from arjax.convert import torch_io
from arjax.models.var import VAR, VARConfig
from arjax.tokenizers.msvq import MSVQConfig, MultiScaleVQVAE


def var_torch_name(path: str, shape: tuple[int, ...]) -> tuple[str, torch_io.Transform]:
    key, transform = torch_io.default_torch_name(path, shape)
    return re.sub(r"ada_lin\.(weight|bias)$", r"ada_lin.1.\1", key), transform


def vae_torch_name(path: str, shape: tuple[int, ...]) -> tuple[str, torch_io.Transform]:
    key, transform = torch_io.default_torch_name(path, shape)
    return re.sub(r"\.res\.(\d+)\.", r".block.\1.", key), transform


def var_buffers(cfg: VARConfig) -> tuple[str, ...]:
    return ("lvl_1L", "attn_bias_for_masking",
            *(f"blocks.{i}.attn.zero_k_bias" for i in range(cfg.depth)))


VAR_FORMAT = torch_io.Format(VAR, var_torch_name, buffers=var_buffers)
VAE_FORMAT = torch_io.Format(MultiScaleVQVAE, vae_torch_name,
                             buffers=lambda cfg: ("quantize.ema_vocab_hit_SV",))


def var_params_from_torch(state_dict, cfg: VARConfig):
    return VAR_FORMAT.from_torch(state_dict, cfg)


def vae_params_from_torch(state_dict, cfg: MSVQConfig):
    return VAE_FORMAT.from_torch(state_dict, cfg)


def load_var(path: str, cfg: VARConfig):
    return VAR_FORMAT.load(path, cfg)


def load_vae(path: str, cfg: MSVQConfig):
    return VAE_FORMAT.load(path, cfg)


def var_to_torch(params) -> dict:
    return VAR_FORMAT.to_torch(params)


def vae_to_torch(params) -> dict:
    return VAE_FORMAT.to_torch(params)
