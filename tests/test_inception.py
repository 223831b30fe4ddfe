"""FID Inception: official key names/shapes, round trip through a torch file, torch-exact ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arjax.convert import torch_io
from arjax.metrics import inception
from arjax.models import split

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.fixture(scope="module")
def abstract():
    return split(nnx.eval_shape(lambda: inception.FIDInception(rngs=nnx.Rngs(0))))


def test_key_table_matches_pytorch_fid(abstract):
    _, params = abstract
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), params)
    sd = torch_io.export(zeros, torch_io.default_torch_name)
    assert len(sd) + 94 == 566  # + one num_batches_tracked per BasicConv2d
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
    assert sd["Mixed_6d.branch7x7_2.conv.weight"].shape == (160, 160, 1, 7)
    assert sd["Mixed_6d.branch1x1.bn.running_var"].shape == (192,)
    assert sd["Mixed_7a.branch3x3_2.conv.weight"].shape == (320, 192, 3, 3)
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert sd["fc.weight"].shape == (1008, 2048) and sd["fc.bias"].shape == (1008,)
    trainable = sum(v.size for k, v in sd.items() if "running" not in k)
    assert trainable == 23_850_960  # torchvision inception_v3, no aux head, 1008 classes


def random_state_dict(shapes, seed: int):
    """Random params (1-D ones around 1, so BN variances stay positive) in torch layout."""
    rng = np.random.default_rng(seed)  # numpy: one jax.random call per shape would compile
    params = jax.tree.map(lambda x: (0.05 * rng.normal(size=x.shape) + 1.0 * (
        x.shape == (x.shape[0],))).astype(np.float32), shapes)
    sd = {k: torch.from_numpy(v.copy())
          for k, v in torch_io.export(params, torch_io.default_torch_name).items()}
    return params, sd


def test_round_trip_through_torch_file(tmp_path, abstract, monkeypatch):
    params, sd = random_state_dict(abstract[1], seed=0)
    sd.update({k.replace("running_var", "num_batches_tracked"): torch.tensor(0)
               for k in list(sd) if k.endswith("running_var")})
    torch.save(sd, tmp_path / inception.WEIGHTS_FILE)
    monkeypatch.setenv("ARJAX_CACHE", str(tmp_path))
    _, loaded = inception.load()
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)


def test_missing_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("ARJAX_CACHE", str(tmp_path))
    with pytest.raises(torch_io.CheckpointMismatch, match="pt_inception-2015-12-05"):
        inception.load()


def test_pools_and_asymmetric_conv_match_torch():
    x = np.random.default_rng(1).normal(size=(2, 9, 9, 6)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    nchw = lambda t: t.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(
        inception.avg_pool_exclude_pad(jnp.asarray(x)),
        nchw(F.avg_pool2d(xt, 3, stride=1, padding=1, count_include_pad=False)), atol=1e-6)
    np.testing.assert_allclose(inception.max_pool(jnp.asarray(x)), nchw(F.max_pool2d(xt, 3, 2)))
    np.testing.assert_allclose(inception.max_pool(jnp.asarray(x), stride=1, padding=1),
                               nchw(F.max_pool2d(xt, 3, stride=1, padding=1)))
    conv = inception.BasicConv(6, 4, (1, 7), padding=(0, 3), rngs=nnx.Rngs(0))
    conv.bn.running_mean[...] = jnp.arange(4.0) / 10
    conv.bn.running_var[...] = jnp.arange(1.0, 5.0)
    w = torch.from_numpy(np.asarray(torch_io.conv_inverse(np.asarray(conv.conv.kernel[...]))))
    ref = F.relu(F.batch_norm(F.conv2d(xt, w, padding=(0, 3)),
                              torch.arange(4.0) / 10, torch.arange(1.0, 5.0), eps=1e-3))
    np.testing.assert_allclose(conv(jnp.asarray(x)), nchw(ref), atol=1e-5)


@pytest.mark.slow  # > 30 s on 2 cores: make test-all
def test_evaluate_cli_with_inception_and_adm_reference_stats(tmp_path, abstract, monkeypatch):
    """Random-weight Inception end to end; precomputed ADM statistics are honoured."""
    import json

    from arjax import evaluate

    _, sd = random_state_dict(abstract[1], seed=1)
    weights = tmp_path / "w.pth"
    torch.save(sd, weights)
    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3)).astype(np.uint8)
    np.savez(tmp_path / "s.npz", images=images)
    feats = evaluate.inception_features(images, str(weights))
    assert feats["pool_3"].shape == (12, 2048) and feats["spatial"].shape == (12, 17 * 17 * 7)
    np.testing.assert_allclose(feats["probs"].sum(-1), 1.0, rtol=1e-5)
    stats = {"mu": feats["pool_3"].mean(0) + 1.0, "sigma": np.cov(feats["pool_3"], rowvar=False),
             "mu_s": feats["spatial"].mean(0), "sigma_s": np.cov(feats["spatial"], rowvar=False)}
    np.savez(tmp_path / "ref.npz", arr_0=images, **stats)
    out = evaluate.main(["--samples", str(tmp_path / "s.npz"), "--reference",
                         str(tmp_path / "ref.npz"), "--inception-weights", str(weights)])
    assert out["fid"] == pytest.approx(2048.0, abs=1.0)  # ||mu shift||^2; sigma identical
    assert abs(out["sfid"]) < 1.0
    assert out["precision"] == 1.0 and out["recall"] == 1.0
    assert 1.0 <= out["inception_score"] < 1008
    assert json.load(open(tmp_path / "s.eval.json"))["fid"] == out["fid"]
