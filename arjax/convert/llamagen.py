"""LlamaGen c2i GPT and VQ-16/VQ-8 checkpoints <-> arjax params.

Names follow the official state_dicts (models/gpt.py, tokenizer_image/vq_model.py); arjax
module paths mirror them, so the mapping is mechanical: `/` -> `.`, Dense/Conv `kernel` ->
`weight` (transposed), GroupNorm `scale` -> `weight`, Embed `embedding` -> `weight`.
"""

from __future__ import annotations

from flax import nnx

from arjax.convert import torch_io
from arjax.models.raster_ar import RasterAR, RasterARConfig
from arjax.tokenizers.vq import VQConfig, VQTokenizer

GPT_BUFFERS = ("freqs_cis",)
VQ_BUFFERS = ("quantize.codebook_used",)


def torch_name(path: str, shape: tuple[int, ...]) -> tuple[str, torch_io.Transform]:
    """arjax param path -> (official torch key, transform torch->arjax)."""
    if path == "cls_embedding/embedding":
        return "cls_embedding.embedding_table.weight", torch_io.identity
    return torch_io.default_torch_name(path, shape)


def gpt_params_from_torch(state_dict, cfg: RasterARConfig):
    abstract = torch_io.abstract_params(lambda: RasterAR(cfg, rngs=nnx.Rngs(0)))
    return torch_io.convert(state_dict, abstract, torch_name, ignore=GPT_BUFFERS)


def vq_params_from_torch(state_dict, cfg: VQConfig):
    abstract = torch_io.abstract_params(lambda: VQTokenizer(cfg, rngs=nnx.Rngs(0)))
    return torch_io.convert(state_dict, abstract, torch_name, ignore=VQ_BUFFERS)


def load_gpt(path: str, cfg: RasterARConfig):
    """Official `c2i_*.pt` (DDP dict with "model"/"ema", or bare FSDP state_dict)."""
    return gpt_params_from_torch(torch_io.load_state_dict(path), cfg)


def load_vq(path: str, cfg: VQConfig):
    """Official `vq_ds16_c2i.pt` / `vq_ds8_c2i.pt` (weights under "model")."""
    return vq_params_from_torch(torch_io.load_state_dict(path, subkeys=("model",)), cfg)


def to_torch(params) -> dict:
    """arjax params -> official-named numpy state_dict (for export and round-trip tests)."""
    return torch_io.export(params, torch_name)
