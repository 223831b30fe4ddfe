"""Official LlamaGen checkpoints: key names, shapes, safe loading, strict errors, round trip."""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import official_shapes, tiny_gpt, tiny_gpt_config
from flax import nnx

from arjax.convert import llamagen
from arjax.convert.torch_io import CheckpointMismatch
from arjax.models import bind, split
from arjax.models.raster_ar import RasterAR, gpt_config
from arjax.tokenizers.vq import VQ_16, VQConfig, VQTokenizer


def abstract_torch_shapes(module_fn):
    return official_shapes(module_fn, llamagen.torch_name)


def test_gpt_b_key_table_matches_official():
    shapes = abstract_torch_shapes(lambda: RasterAR(gpt_config("B"), rngs=nnx.Rngs(0)))
    assert len(shapes) == 88
    assert shapes["cls_embedding.embedding_table.weight"] == (1001, 768)
    assert shapes["tok_embeddings.weight"] == (16384, 768)
    assert shapes["layers.11.attention.wqkv.weight"] == (2304, 768)
    assert shapes["layers.0.attention.wo.weight"] == (768, 768)
    assert shapes["layers.0.feed_forward.w1.weight"] == (2048, 768)
    assert shapes["layers.0.feed_forward.w2.weight"] == (768, 2048)
    assert shapes["layers.0.attention_norm.weight"] == (768,)
    assert shapes["output.weight"] == (16384, 768)
    assert sum(np.prod(s) for s in shapes.values()) == pytest.approx(110.9e6, rel=2e-3)


@pytest.mark.parametrize("size,ffn,params", [("L", 2816, 342.9e6), ("3B", 8704, 3096.7e6)])
def test_other_gpt_sizes(size, ffn, params):
    shapes = abstract_torch_shapes(lambda: RasterAR(gpt_config(size), rngs=nnx.Rngs(0)))
    assert shapes["layers.0.feed_forward.w1.weight"][0] == ffn
    assert sum(np.prod(s) for s in shapes.values()) == pytest.approx(params, rel=2e-3)


def test_vq16_key_table_matches_official():
    shapes = abstract_torch_shapes(lambda: VQTokenizer(VQ_16, rngs=nnx.Rngs(0)))
    assert len(shapes) + len(llamagen.VQ.buffers(VQ_16)) == 344
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["encoder.conv_out.weight"] == (256, 512, 3, 3)
    assert shapes["encoder.conv_blocks.4.attn.1.q.weight"] == (512, 512, 1, 1)
    assert shapes["encoder.conv_blocks.0.downsample.conv.weight"] == (128, 128, 3, 3)
    assert shapes["decoder.conv_in.weight"] == (512, 256, 3, 3)
    assert shapes["decoder.conv_blocks.0.attn.2.proj_out.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.conv_blocks.0.res.2.conv2.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.conv_blocks.3.upsample.conv.weight"] == (128, 128, 3, 3)
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in shapes
    assert "decoder.conv_blocks.4.res.0.nin_shortcut.weight" not in shapes
    assert shapes["decoder.conv_blocks.3.res.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["quantize.embedding.weight"] == (16384, 8)
    assert shapes["quant_conv.weight"] == (8, 256, 1, 1)
    assert shapes["post_quant_conv.weight"] == (256, 8, 1, 1)
    assert sum(np.prod(s) for s in shapes.values()) == pytest.approx(71.9e6, rel=2e-3)


def save_like_official(path, state_dict, wrap):
    torch = pytest.importorskip("torch")
    tensors = {k: torch.from_numpy(v.copy()) for k, v in state_dict.items()}
    obj = tensors
    if wrap:  # LlamaGen DDP files: {"model", "optimizer", "steps", "args": Namespace}; also
        # DeepSpeed's "module" and Lightning's "state_dict", which the official sampler reads
        key = wrap if isinstance(wrap, str) else "model"
        obj = {key: tensors, "steps": 10, "args": argparse.Namespace(gpt_model="GPT-B")}
    torch.save(obj, path)


@pytest.mark.parametrize("wrap", [True, False, "module", "state_dict"])
def test_gpt_round_trip_through_torch_file(tmp_path, wrap):
    graphdef, params = tiny_gpt()
    sd = llamagen.to_torch(params)
    sd["freqs_cis"] = np.zeros((10, 4, 2), np.float32)  # stray buffer in old files
    save_like_official(tmp_path / "c2i.pt", sd, wrap)
    loaded = llamagen.load_gpt(str(tmp_path / "c2i.pt"), tiny_gpt_config())
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    tokens, labels = jnp.zeros((1, 9), jnp.int32), jnp.array([1])
    np.testing.assert_array_equal(bind(graphdef, params)(tokens, labels),
                                  bind(graphdef, loaded)(tokens, labels))


def test_vq_round_trip_through_safetensors(tmp_path):
    from safetensors.numpy import save_file

    cfg = VQConfig(codebook_size=32, codebook_dim=4, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                   z_channels=16, norm_groups=8)
    graphdef, params = split(VQTokenizer(cfg, rngs=nnx.Rngs(0)))
    sd = llamagen.to_torch(params)
    sd["quantize.codebook_used"] = np.zeros(65536, np.float32)
    save_file(sd, str(tmp_path / "vq.safetensors"))
    loaded = llamagen.load_vq(str(tmp_path / "vq.safetensors"), cfg)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)


def test_mismatched_checkpoint_names_the_problems():
    _, params = tiny_gpt()
    sd = llamagen.to_torch(params)
    del sd["layers.1.ffn_norm.weight"]
    sd["layers.0.attention.wo.weight"] = np.zeros((32, 31), np.float32)
    sd["extra.head.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(CheckpointMismatch) as err:
        llamagen.gpt_params_from_torch(sd, tiny_gpt_config())
    msg = str(err.value)
    assert "missing key 'layers.1.ffn_norm.weight'" in msg
    assert "shape mismatch at 'layers.0.attention.wo.weight'" in msg
    assert "unexpected key 'extra.head.weight'" in msg


def test_wrong_size_preset_is_reported(tmp_path):
    _, params = tiny_gpt()
    with pytest.raises(CheckpointMismatch, match="shape mismatch"):
        llamagen.gpt_params_from_torch(llamagen.to_torch(params), tiny_gpt_config(dim=64))


def test_unreadable_file(tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatch, match="not a readable"):
        llamagen.load_gpt(str(path), tiny_gpt_config())


def test_no_known_wrapper_names_the_top_level_keys(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"weights_here": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointMismatch, match=r"top-level keys are \['epoch', "
                                                   r"'weights_here'\]"):
        llamagen.load_gpt(str(tmp_path / "odd.pt"), tiny_gpt_config())


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + os.environ["ARJAX_PWNED"],))


@pytest.mark.parametrize("protocol", [2, 4])
def test_checkpoint_with_code_is_refused_without_running_it(tmp_path, monkeypatch, protocol):
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("ARJAX_PWNED", str(tmp_path / "pwned"))
    torch.save({"model": {"w": Payload()}}, tmp_path / "evil.pt", pickle_protocol=protocol)
    with pytest.raises(CheckpointMismatch, match=r"code objects \((posix|nt)\.system\)") as e:
        llamagen.load_gpt(str(tmp_path / "evil.pt"), tiny_gpt_config())
    assert "weights_only=False" not in str(e.value)
    assert not (tmp_path / "pwned").exists()
