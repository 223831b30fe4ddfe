"""Official FlowAR / KL-16 key tables (names and shapes of the released files) and round trips
through real torch files (plain state_dict, MAR's model_ema dict, LDM's LitEma shadows)."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import official_shapes, random_params
from flax import nnx

from arjax.convert import flowar as conv
from arjax.convert.torch_io import CheckpointMismatch
from arjax.models.flowar import FlowAR, FlowARConfig, flowar_config
from arjax.tokenizers.kl import KL_16, KLVAE, KLConfig


def flowar_table(cfg):
    table = official_shapes(lambda: FlowAR(cfg, rngs=nnx.Rngs(0)), conv.flowar_torch_name)
    return {**table, **{k: v.shape for k, v in conv.flowar_buffers(cfg).items()}}


def test_flowar_l_key_table_matches_official():
    table = flowar_table(flowar_config("L"))
    assert len(table) == 484
    expected = {
        "encoder_pos_embed_learned": (1, 341, 1024), "mask": (1, 1, 341, 341),
        "class_emb.weight": (1001, 1024), "z_proj.weight": (1024, 16),
        "z_proj_ln.weight": (1024,), "decoder_embed.weight": (1024, 1024),
        "encoder_blocks.7.attn.qkv.weight": (3072, 1024),
        "decoder_blocks.0.attn.qkv.bias": (3072,), "decoder_blocks.0.attn.rope.freqs": (16,),
        "encoder_blocks.0.mlp.fc1_g.weight": (2730, 1024),
        "encoder_blocks.0.mlp.fc1_x.bias": (2730,), "encoder_blocks.0.mlp.fc2.weight":
        (1024, 2730), "encoder_blocks.0.ada_lin.1.weight": (6144, 1024),
        "flownet.time_embed.mlp.0.weight": (1024, 256),
        "flownet.time_embed.mlp.2.weight": (1024, 1024),
        "flownet.cond_embed.weight": (1024, 1024), "flownet.input_proj.weight": (1024, 16),
        "flownet.res_blocks.11.attn.qkv.weight": (3072, 1024),
        "flownet.res_blocks.0.crossattn.q.weight": (1024, 1024),
        "flownet.res_blocks.0.crossattn.kv.weight": (2048, 1024),
        "flownet.res_blocks.0.crossattn.rope.freqs": (16,),
        "flownet.res_blocks.0.norm2_1.weight": (1024,),
        "flownet.res_blocks.0.norm2_2.weight": (1024,),
        "flownet.res_blocks.0.ada_lin_attn.weight": (3072, 1024),
        "flownet.res_blocks.0.ada_lin_mlp.bias": (3072,),
        "flownet.final_layer.linear.weight": (16, 1024),
        "flownet.final_layer.adaLN_modulation.1.weight": (2048, 1024),
    }
    for key, shape in expected.items():
        assert table[key] == shape, key
    assert "flownet.res_blocks.0.attn.qkv.bias" not in table  # no qkv bias in the head


@pytest.mark.slow  # > 20 s on 2 cores: make test-all
def test_flowar_s_and_h_keys():
    small = flowar_table(flowar_config("S"))
    assert small["flownet.res_blocks.1.ada_lin.weight"] == (6144, 1024)  # Block_v1: no Seq.
    assert not any("crossattn" in k for k in small)
    huge = flowar_table(flowar_config("H"))
    assert huge["encoder_blocks.14.attn.rope.freqs"] == (24,)  # head dim 96
    assert huge["flownet.res_blocks.0.attn.qkv.weight"] == (4608, 1536)


def test_kl16_key_table_matches_official():
    table = official_shapes(lambda: KLVAE(KL_16, rngs=nnx.Rngs(0)), conv.vae_torch_name)
    for key, shape in {"encoder.down.4.attn.1.q.weight": (512, 512, 1, 1),
                       "encoder.down.4.block.1.conv2.weight": (512, 512, 3, 3),
                       "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
                       "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
                       "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
                       "encoder.conv_out.weight": (32, 512, 3, 3),
                       "decoder.conv_in.weight": (512, 16, 3, 3),
                       "decoder.up.4.block.2.conv1.weight": (512, 512, 3, 3),
                       "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
                       "decoder.mid.attn_1.k.weight": (512, 512, 1, 1),
                       "quant_conv.weight": (32, 32, 1, 1),
                       "post_quant_conv.weight": (16, 16, 1, 1)}.items():
        assert table.get(key) == shape, key
    assert "encoder.down.1.block.0.nin_shortcut.weight" not in table  # 128 -> 128
    assert not any(k.startswith("decoder.up.") and ".attn." in k for k in table)
    assert not any(k.startswith("encoder.down.3.attn") for k in table)


TINY = FlowARConfig(width=32, depth=1, heads=2, head_width=64, head_depth=1, cross=True,
                    scales=(1, 2), token_dim=3, num_classes=4)
TINY_KL = KLConfig(embed_dim=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4)


def _save(torch, obj, path):
    to_torch = lambda d: {k: torch.from_numpy(np.array(v)) for k, v in d.items()}
    torch.save({k: to_torch(v) if isinstance(v, dict) else v for k, v in obj.items()}
               if "model" in obj or "model_ema" in obj else to_torch(obj), path)


def test_flowar_round_trip_through_torch_files(tmp_path):
    torch = pytest.importorskip("torch")
    params = random_params(lambda: FlowAR(TINY, rngs=nnx.Rngs(0)), 0)
    state = conv.flowar_to_torch(params, TINY)
    path = str(tmp_path / "FlowAR-T.pth")
    _save(torch, state, path)  # release format: a plain state_dict (EMA weights)
    jax.tree.map(np.testing.assert_array_equal, conv.load_flowar(path, TINY), params)
    raw = {k: np.zeros_like(v) for k, v in state.items()}  # training format: model_ema wins
    _save(torch, {"model": raw, "model_ema": state, "epoch": 3}, path)
    jax.tree.map(np.testing.assert_array_equal, conv.load_flowar(path, TINY), params)
    del state["flownet.res_blocks.0.crossattn.kv.weight"]
    state["extra.weight"] = np.zeros(2, np.float32)
    _save(torch, state, path)
    with pytest.raises(CheckpointMismatch, match="(?s)missing key 'flownet.res_blocks.0."
                       "crossattn.kv.weight'.*unexpected key 'extra.weight'"):
        conv.load_flowar(path, TINY)
    _save(torch, conv.flowar_to_torch(params, TINY), path)
    with pytest.raises(CheckpointMismatch, match="shape mismatch at 'class_emb.weight'"):
        conv.load_flowar(path, dataclasses.replace(TINY, num_classes=9))


def test_kl_round_trip_with_ema_shadows_and_training_keys(tmp_path):
    torch = pytest.importorskip("torch")
    params = random_params(lambda: KLVAE(TINY_KL, rngs=nnx.Rngs(0)), 1)
    state = conv.kl_to_torch(params)
    path = str(tmp_path / "kl.ckpt")
    extra = {"loss.discriminator.main.0.weight": np.zeros((4, 3, 4, 4), np.float32),
             "loss.logvar": np.zeros((), np.float32)}
    _save(torch, {"model": {**state, **extra}}, path)
    jax.tree.map(np.testing.assert_array_equal, conv.load_kl(path, TINY_KL), params)
    shadows = {"model_ema." + k.replace(".", ""): v + 1 for k, v in state.items()}
    shadows["model_ema.num_updates"] = np.array(7, np.int64)
    _save(torch, {"model": {**state, **shadows}}, path)
    ema = conv.load_kl(path, TINY_KL, ema=True)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b + 1), ema, params)
    raw = conv.load_kl(path, TINY_KL)  # the default is what the official loaders load
    jax.tree.map(np.testing.assert_array_equal, raw, params)
