"""The FID Inception-v3 (TF graph of 2015-12-05, as ported by pytorch-fid) in Flax NNX.

Weights come from a local copy of `pt_inception-2015-12-05-6726825d.pth` (never downloaded at
run time). Outputs are what the ADM evaluator uses: `pool_3` (2048 features, FID, precision/
recall), the first 7 channels of `mixed_6/conv` (the 1x1 branch of the fourth 17x17 block,
Mixed_6d; 17*17*7 = 2023 features, sFID) and softmax of the 1008 logits *without* the fc bias
(ADM multiplies pool_3 by the `softmax/logits/MatMul` weight only), for IS.

Preprocessing follows pytorch-fid: bilinear resize to 299 (torch `align_corners=False`, as an
explicit matrix) and scaling to [-1, 1]. Module names mirror the torch state_dict
(`Mixed_6d.branch7x7_1.conv.weight`, `...bn.running_var`) so conversion is mechanical.
Shapes: N images, H/W input size; activations are NHWC.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.nn.resize import resize

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)
SPATIAL_CHANNELS = 7


class BN(nnx.Module):
    """Inference batch norm with torch's parameter names (eps 1e-3 as in the TF graph)."""

    def __init__(self, c: int):
        self.weight = nnx.Param(jnp.ones((c,)))
        self.bias = nnx.Param(jnp.zeros((c,)))
        self.running_mean = nnx.Param(jnp.zeros((c,)))
        self.running_var = nnx.Param(jnp.ones((c,)))

    def __call__(self, x):
        scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + 1e-3)
        return (x - self.running_mean[...]) * scale + self.bias[...]


class BasicConv(nnx.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0, *, rngs):
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = (padding, padding) if isinstance(padding, int) else padding
        self.conv = nnx.Conv(cin, cout, kernel, strides=stride, use_bias=False,
                             padding=[(padding[0],) * 2, (padding[1],) * 2], rngs=rngs)
        self.bn = BN(cout)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x, stride=2, padding=0):
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                                 pad)


def avg_pool_exclude_pad(x):
    """3x3, stride 1, padding 1, zeros not counted (TF's average pool)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    count = jax.lax.reduce_window(jnp.ones(x.shape[1:3]), 0.0, jax.lax.add, (3, 3), (1, 1),
                                  ((1, 1), (1, 1)))
    return total / count[None, :, :, None]


class InceptionA(nnx.Module):
    def __init__(self, cin, pool_features, *, rngs):
        self.branch1x1 = BasicConv(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, pool], -1)


class InceptionB(nnx.Module):
    def __init__(self, cin, *, rngs):
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool(x)], -1)


class InceptionC(nnx.Module):
    def __init__(self, cin, c7, *, rngs):
        row = dict(kernel=(1, 7), padding=(0, 3))
        col = dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv(c7, c7, **row, rngs=rngs)
        self.branch7x7_3 = BasicConv(c7, 192, **col, rngs=rngs)
        self.branch7x7dbl_1 = BasicConv(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv(c7, c7, **col, rngs=rngs)
        self.branch7x7dbl_3 = BasicConv(c7, c7, **row, rngs=rngs)
        self.branch7x7dbl_4 = BasicConv(c7, c7, **col, rngs=rngs)
        self.branch7x7dbl_5 = BasicConv(c7, 192, **row, rngs=rngs)
        self.branch_pool = BasicConv(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        pool = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, d, pool], -1), b1


class InceptionD(nnx.Module):
    def __init__(self, cin, *, rngs):
        self.branch3x3_1 = BasicConv(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x)], -1)


class InceptionE(nnx.Module):
    """`max_pool_branch`: the FID graph's last block pools with max instead of average."""

    def __init__(self, cin, max_pool_branch: bool, *, rngs):
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], -1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = jnp.concatenate([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], -1)
        pooled = max_pool(x, stride=1, padding=1) if self.max_pool_branch \
            else avg_pool_exclude_pad(x)
        return jnp.concatenate([self.branch1x1(x), b3, d, self.branch_pool(pooled)], -1)


class FIDInception(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False, rngs=rngs)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True, rngs=rngs)
        self.fc = nnx.Linear(2048, 1008, rngs=rngs)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """images uint8 [N,H,W,3] (or floats in [0,255]) -> pool_3 [N,2048],
        spatial [N,2023], probs [N,1008]."""
        x = resize(images.astype(jnp.float32) / 255.0, 299, "bilinear") * 2.0 - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool(x)))
        x = max_pool(x)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x)
        x, _ = self.Mixed_6b(x)
        x, _ = self.Mixed_6c(x)
        x, mixed_6_conv = self.Mixed_6d(x)  # TF's mixed_6/conv: Mixed_6d's 1x1 branch
        x, _ = self.Mixed_6e(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool3 = jnp.mean(x, axis=(1, 2))
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        probs = jax.nn.softmax(pool3 @ self.fc.kernel[...], axis=-1)
        return {"pool_3": pool3, "spatial": spatial, "probs": probs}


def default_weights_path() -> str:
    cache = os.environ.get("ARJAX_CACHE", os.path.expanduser("~/.cache/arjax"))
    return os.path.join(cache, WEIGHTS_FILE)


def load(path: str | None = None):
    """(graphdef, params) of the FID Inception from the local pytorch-fid weights file."""
    from arjax.convert import torch_io
    from arjax.models import split

    path = path or default_weights_path()
    if not os.path.exists(path):
        raise torch_io.CheckpointMismatch(
            f"FID Inception weights not found at {path!r}. arjax never downloads at run time: "
            f"fetch {WEIGHTS_URL} on a machine with internet access and copy it there (or pass "
            "--inception-weights / set ARJAX_CACHE).")
    graphdef, abstract = split(nnx.eval_shape(lambda: FIDInception(rngs=nnx.Rngs(0))))
    params = torch_io.convert(torch_io.load_state_dict(path), abstract,
                              torch_io.default_torch_name, ignore=_buffers(abstract))
    return graphdef, params


def _buffers(abstract) -> list[str]:
    """`num_batches_tracked` counters of every BN in the torch file (not used at inference)."""
    from arjax.sharding import path_str

    names = {path_str(p).rsplit("/bn/", 1)[0] for p, _ in
             jax.tree_util.tree_flatten_with_path(abstract)[0] if "/bn/" in path_str(p)}
    return [n.replace("/", ".") + ".bn.num_batches_tracked" for n in names]
