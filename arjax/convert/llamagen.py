"""LlamaGen c2i GPT and VQ-16/VQ-8 checkpoints <-> arjax params.

Names follow the official state_dicts (models/gpt.py, tokenizer_image/vq_model.py); arjax
module paths mirror them, so the mapping is mechanical: `/` -> `.`, Dense/Conv `kernel` ->
`weight` (transposed), GroupNorm `scale` -> `weight`, Embed `embedding` -> `weight`. GPT files
are DDP dicts ("model"/"ema"), DeepSpeed ("module"), Lightning ("state_dict") or bare FSDP
state_dicts; the VQ's weights are under "model".
"""

from __future__ import annotations

from arjax.convert import torch_io
from arjax.models.raster_ar import RasterAR, RasterARConfig
from arjax.tokenizers.vq import VQConfig, VQTokenizer


def torch_name(path: str, shape: tuple[int, ...]) -> tuple[str, torch_io.Transform]:
    """arjax param path -> (official torch key, transform torch->arjax)."""
    if path == "cls_embedding/embedding":
        return "cls_embedding.embedding_table.weight", torch_io.identity
    return torch_io.default_torch_name(path, shape)


GPT = torch_io.Format(RasterAR, torch_name, buffers=lambda cfg: ("freqs_cis",))
VQ = torch_io.Format(VQTokenizer, torch_name, buffers=lambda cfg: ("quantize.codebook_used",),
                     subkeys=("model",))


def gpt_params_from_torch(state_dict, cfg: RasterARConfig):
    return GPT.from_torch(state_dict, cfg)


def vq_params_from_torch(state_dict, cfg: VQConfig):
    return VQ.from_torch(state_dict, cfg)


def load_gpt(path: str, cfg: RasterARConfig):
    """Official `c2i_*.pt`."""
    return GPT.load(path, cfg)


def load_vq(path: str, cfg: VQConfig):
    """Official `vq_ds16_c2i.pt` / `vq_ds8_c2i.pt`."""
    return VQ.load(path, cfg)


def to_torch(params) -> dict:
    """arjax params (GPT or VQ) -> official-named numpy state_dict."""
    return GPT.to_torch(params)
