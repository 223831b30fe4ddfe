"""Released Distilled Decoding students (microsoft/distilled_decoding on Hugging Face) <->
arjax: `LlamaGen-DD/llamagen-{B,L}.pt` (weights under "ema") and `VAR-DD/var-d{16,20,24}.pth`
(under "trainer" -> "ema_parameters", else "trainer" -> "var_wo_ddp").

The students keep their teachers' names (`arjax.convert.llamagen` / `arjax.convert.var`) plus
`tok_embeddings` (now a Linear), `n_d_embed`, `layerwise_n_d_embed.{i}` (VAR) and
`final_layer_conti.{linear, scale_shift_table}`. Loading is strict (the originals load with
strict=False); only buffers arjax recomputes are ignored.
"""

from __future__ import annotations

from arjax.convert import torch_io
from arjax.convert.llamagen import torch_name as raster_torch_name
from arjax.convert.var import var_buffers, var_torch_name
from arjax.distill.students import DDVAR, DDRaster
from arjax.models.raster_ar import RasterARConfig
from arjax.models.var import VARConfig

DD_RASTER = torch_io.Format(lambda spec, rngs: DDRaster(*spec, rngs=rngs), raster_torch_name,
                            buffers=lambda spec: ("freqs_cis",),
                            subkeys=("ema", "model", "module", "state_dict"))
DD_VAR = torch_io.Format(DDVAR, var_torch_name, buffers=var_buffers,
                         subkeys=("trainer.ema_parameters", "trainer.var_wo_ddp",
                                  *torch_io.WRAPPERS))


def load_dd_raster(path: str, cfg: RasterARConfig, code_dim: int = 8):
    """A released `llamagen-{B,L}.pt` (the teacher's config, its codebook dimension)."""
    return DD_RASTER.load(path, (cfg, code_dim))


def load_dd_var(path: str, cfg: VARConfig):
    """A released `var-d{16,20,24}.pth` (the teacher's config)."""
    return DD_VAR.load(path, cfg)


def dd_to_torch(params) -> dict:
    """arjax DD student params (either family) -> the released numpy state_dict."""
    name_of = var_torch_name if "layerwise_n_d_embed" in params else raster_torch_name
    return torch_io.export(params, name_of)
