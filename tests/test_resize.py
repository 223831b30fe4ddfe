"""Resize matrices equal torch's F.interpolate (bilinear for FID, bicubic and area for VAR)."""

import jax.numpy as jnp
import numpy as np
import pytest

from arjax.nn.resize import resize

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("mode,n_in,n_out", [
    ("bilinear", 64, 299), ("bilinear", 512, 299),
    *[("bicubic", n, 16) for n in (1, 2, 3, 5, 10, 13)], ("bicubic", 5, 32), ("bicubic", 16, 7),
    *[("area", 16, n) for n in (1, 2, 3, 4, 5, 6, 8, 10, 13)], ("area", 32, 24), ("area", 8, 3),
])
def test_resize_matches_torch(mode, n_in, n_out):
    x = np.random.default_rng(0).normal(size=(2, n_in, n_in, 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(n_out, n_out), mode=mode,
        **({} if mode == "area" else {"align_corners": False})).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(resize(jnp.asarray(x), n_out, mode), ref, atol=2e-5)
