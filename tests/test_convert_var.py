"""Official VAR / VAR-VAE key tables (names and shapes from the released files) and a round
trip through a real torch file."""

import jax
import numpy as np
import pytest
from conftest import official_shapes, random_params
from flax import nnx

from arjax.convert import var as var_convert
from arjax.convert.torch_io import CheckpointMismatch
from arjax.models.var import VAR, VARConfig, var_config
from arjax.tokenizers.msvq import VAR_VAE, MSVQConfig, MultiScaleVQVAE


def test_var_d16_key_table_matches_official():
    cfg = var_config(16)
    shapes = official_shapes(lambda: VAR(cfg, rngs=nnx.Rngs(0)), var_convert.var_torch_name)
    assert len(shapes) + len(var_convert.var_buffers(cfg)) == 220
    expected = {"pos_start": (1, 1, 1024), "pos_1LC": (1, 680, 1024),
                "word_embed.weight": (1024, 32), "word_embed.bias": (1024,),
                "class_emb.weight": (1001, 1024), "lvl_embed.weight": (10, 1024),
                "blocks.15.attn.scale_mul_1H11": (1, 16, 1, 1), "blocks.0.attn.q_bias": (1024,),
                "blocks.0.attn.v_bias": (1024,), "blocks.0.attn.mat_qkv.weight": (3072, 1024),
                "blocks.0.attn.proj.weight": (1024, 1024), "blocks.0.attn.proj.bias": (1024,),
                "blocks.0.ffn.fc1.weight": (4096, 1024), "blocks.0.ffn.fc2.weight": (1024, 4096),
                "blocks.0.ada_lin.1.weight": (6144, 1024), "blocks.0.ada_lin.1.bias": (6144,),
                "head_nm.ada_lin.1.weight": (2048, 1024), "head_nm.ada_lin.1.bias": (2048,),
                "head.weight": (4096, 1024), "head.bias": (4096,)}
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert "blocks.0.attn.mat_qkv.bias" not in shapes  # q/v biases are separate, k has none


def test_var_d36_shared_adaln_keys():
    shapes = official_shapes(lambda: VAR(var_config(36), rngs=nnx.Rngs(0)),
                          var_convert.var_torch_name)
    assert shapes["blocks.0.ada_gss"] == (1, 1, 6, 2304)
    assert shapes["shared_ada_lin.1.weight"] == (13824, 2304)
    assert shapes["pos_1LC"] == (1, 2240, 2304)
    assert "blocks.0.ada_lin.1.weight" not in shapes


def test_vae_key_table_matches_official():
    shapes = official_shapes(lambda: MultiScaleVQVAE(VAR_VAE, rngs=nnx.Rngs(0)),
                          var_convert.vae_torch_name)
    assert len(shapes) + len(var_convert.VAE_FORMAT.buffers(VAR_VAE)) == 324
    expected = {"encoder.conv_in.weight": (160, 3, 3, 3),
                "encoder.down.0.block.1.conv2.weight": (160, 160, 3, 3),
                "encoder.down.2.block.0.nin_shortcut.weight": (320, 160, 1, 1),
                "encoder.down.3.downsample.conv.weight": (320, 320, 3, 3),
                "encoder.down.4.attn.1.qkv.weight": (1920, 640, 1, 1),
                "encoder.down.4.attn.0.proj_out.weight": (640, 640, 1, 1),
                "encoder.mid.attn_1.qkv.weight": (1920, 640, 1, 1),
                "encoder.mid.block_2.norm1.weight": (640,),
                "encoder.conv_out.weight": (32, 640, 3, 3),
                "decoder.conv_in.weight": (640, 32, 3, 3),
                "decoder.up.4.block.2.conv1.weight": (640, 640, 3, 3),
                "decoder.up.4.attn.2.qkv.weight": (1920, 640, 1, 1),
                "decoder.up.4.upsample.conv.weight": (640, 640, 3, 3),
                "decoder.up.1.upsample.conv.weight": (160, 160, 3, 3),
                "decoder.up.3.block.0.nin_shortcut.weight": (320, 640, 1, 1),
                "decoder.norm_out.weight": (160,), "decoder.conv_out.weight": (3, 160, 3, 3),
                "quantize.embedding.weight": (4096, 32),
                "quantize.quant_resi.qresi_ls.3.weight": (32, 32, 3, 3),
                "quantize.quant_resi.qresi_ls.0.bias": (32,),
                "quant_conv.weight": (32, 32, 3, 3), "post_quant_conv.weight": (32, 32, 3, 3)}
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert "encoder.down.4.downsample.conv.weight" not in shapes


TINY_VAR = VARConfig(depth=2, width=32, heads=2, vocab_size=16, codebook_dim=4,
                     patch_nums=(1, 2, 4), num_classes=5)
TINY_VAE = MSVQConfig(codebook_size=16, codebook_dim=4, patch_nums=(1, 2, 4), ch=8,
                      ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4)


@pytest.mark.parametrize("kind", ["var", "vae"])
def test_round_trip_through_torch_file(tmp_path, kind):
    torch = pytest.importorskip("torch")
    if kind == "var":
        params = random_params(lambda: VAR(TINY_VAR, rngs=nnx.Rngs(0)), 0)
        state = var_convert.var_to_torch(params)
        state.update({b: np.zeros(1, np.float32) for b in var_convert.var_buffers(TINY_VAR)})
        load = lambda p: var_convert.load_var(p, TINY_VAR)
    else:
        params = random_params(lambda: MultiScaleVQVAE(TINY_VAE, rngs=nnx.Rngs(0)), 1)
        state = var_convert.vae_to_torch(params)
        state["quantize.ema_vocab_hit_SV"] = np.zeros((3, 16), np.float32)
        load = lambda p: var_convert.load_vae(p, TINY_VAE)
    path = str(tmp_path / f"{kind}.pth")
    torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, path)
    jax.tree.map(np.testing.assert_array_equal, load(path), params)
    del state[next(k for k in state if k.endswith(".weight"))]
    state["extra.weight"] = np.zeros(2, np.float32)
    torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, path)
    with pytest.raises(CheckpointMismatch, match="(?s)missing key .*unexpected key 'extra.weight'"):
        load(path)
