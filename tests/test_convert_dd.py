"""Released Distilled Decoding students: key tables with the released names and shapes, the
released parameter counts, and round trips through real torch files in the released wrappers."""

import jax
import numpy as np
import pytest
from conftest import official_shapes, random_params
from flax import nnx

from arjax.convert import dd
from arjax.convert.torch_io import CheckpointMismatch, abstract_params
from arjax.distill.students import DDVAR, DDRaster
from arjax.models import param_count
from arjax.models.raster_ar import RasterARConfig, gpt_config
from arjax.models.var import VAR, VARConfig, var_config


def test_llamagen_dd_key_table_and_size():
    cfg = gpt_config("B")
    shapes = official_shapes(lambda: DDRaster(cfg, 8, rngs=nnx.Rngs(0)),
                             dd.raster_torch_name)
    expected = {"tok_embeddings.weight": (768, 8), "tok_embeddings.bias": (768,),
                "n_d_embed.weight": (2, 768), "cls_embedding.embedding_table.weight": (1001, 768),
                "layers.11.attention.wqkv.weight": (2304, 768), "norm.weight": (768,),
                "output.weight": (16384, 768), "final_layer_conti.linear.weight": (8, 768),
                "final_layer_conti.linear.bias": (8,),
                "final_layer_conti.scale_shift_table": (2, 768)}
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert "tok_embeddings.embedding" not in shapes
    counts = {s: param_count(abstract_params(lambda s=s: DDRaster(gpt_config(s), 8,
                                                                   rngs=nnx.Rngs(0))))
              for s in ("B", "L")}
    # the DD paper's sizes: 98.3M (teacher GPT-B 111M) and 326M (GPT-L 343M)
    assert round(counts["B"] / 1e6, 1) == 98.3 and round(counts["L"] / 1e6) == 326


def test_var_dd_key_table_and_size():
    cfg = var_config(16)
    shapes = official_shapes(lambda: DDVAR(cfg, rngs=nnx.Rngs(0)), dd.var_torch_name)
    expected = {"pos_1LC": (1, 681, 1024), "lvl_embed.weight": (11, 1024),
                "n_d_embed.weight": (2, 1024), "layerwise_n_d_embed.16.weight": (1024, 1024),
                "layerwise_n_d_embed.0.bias": (1024,), "class_emb.weight": (1001, 1024),
                "final_layer_conti.linear.weight": (32, 1024),
                "final_layer_conti.scale_shift_table": (2, 1024),
                "blocks.0.ada_lin.1.weight": (6144, 1024), "head.weight": (4096, 1024)}
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    teacher = official_shapes(lambda: VAR(cfg, rngs=nnx.Rngs(0)), dd.var_torch_name)
    assert len(shapes) - len(teacher) == 1 + 2 * 17 + 3  # n_d, 17 projections, the head
    c = 1024
    student = param_count(abstract_params(lambda: DDVAR(cfg, rngs=nnx.Rngs(0))))
    base = param_count(abstract_params(lambda: VAR(cfg, rngs=nnx.Rngs(0))))
    assert student - base == 17 * (c * c + c) + 2 * c + 2 * c + (2 * c + 32 * c + 32)


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_round_trip_through_released_wrappers(tmp_path, family):
    torch = pytest.importorskip("torch")
    if family == "llamagen":
        cfg = RasterARConfig(vocab_size=16, grid=3, num_classes=4, dim=32, depth=2, heads=2,
                             multiple_of=8)
        params = random_params(lambda: DDRaster(cfg, 4, rngs=nnx.Rngs(0)), 0)
        wrap = lambda sd: {"ema": sd, "model": {}, "steps": 10}
        load = lambda p: dd.load_dd_raster(p, cfg, 4)
    else:
        cfg = VARConfig(depth=2, width=32, heads=2, vocab_size=16, codebook_dim=4,
                        patch_nums=(1, 2, 4), num_classes=5)
        params = random_params(lambda: DDVAR(cfg, rngs=nnx.Rngs(0)), 1)
        wrap = lambda sd: {"trainer": {"ema_parameters": sd, "var_opt": {}}, "args": {}}
        load = lambda p: dd.load_dd_var(p, cfg)
    state = dd.dd_to_torch(params)
    path = str(tmp_path / "dd.pt")
    tensors = lambda sd: {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
    torch.save(wrap(tensors(state)), path)
    jax.tree.map(np.testing.assert_array_equal, load(path), params)
    del state["n_d_embed.weight"]
    torch.save(wrap(tensors(state)), path)
    with pytest.raises(CheckpointMismatch, match="missing key 'n_d_embed.weight'"):
        load(path)
