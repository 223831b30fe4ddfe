import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from arjax.data import DataConfig, DataError, open_source
from arjax.data.sources import digits
from arjax.images import to_float
from arjax.models import bind, split
from arjax.tokenizers.vq import VQConfig, VQTokenizer

TINY_VQ = VQConfig(codebook_size=64, codebook_dim=8, ch=16, ch_mult=(1, 2, 2),
                   num_res_blocks=1, z_channels=32, norm_groups=8)


def test_digits_splits():
    train, test = digits("train", 32), digits("test", 32)
    assert train.num_examples == 1500 and test.num_examples == 297
    assert train.image_shape == (32, 32, 3) and train.images.dtype == np.uint8
    assert set(np.unique(train.labels)) == set(range(10))
    np.testing.assert_array_equal(digits("train", 32).images, train.images)


@pytest.mark.slow  # > 30 s on 2 cores: make test-all
def test_quantizer_picks_nearest_normalised_code():
    vq = VQTokenizer(TINY_VQ, rngs=nnx.Rngs(0))
    z = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    z_q, codes, _ = vq.quantize(z)
    table = vq.quantize.codebook()
    zn = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    np.testing.assert_array_equal(codes, jnp.argmax(zn @ table.T, -1))
    np.testing.assert_allclose(z_q, table[codes], atol=1e-6)


@pytest.mark.slow  # > 30 s on 2 cores: make test-all
def test_tokenizer_learns_to_reconstruct_digits():
    """A short training run gives a measured reconstruction bound on held-out digits."""
    graphdef, params = split(VQTokenizer(TINY_VQ, rngs=nnx.Rngs(0)))
    tx = optax.adam(3e-3, b1=0.9, b2=0.95)
    opt = tx.init(params)
    x_train = to_float(digits("train", 32).images)
    x_test = to_float(digits("test", 32).images[:64])

    @jax.jit
    def step(params, opt, x):
        def loss(p):
            rec, aux = bind(graphdef, p)(x)
            return jnp.mean((rec - x) ** 2) + aux["codebook"] + aux["commit"]

        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    rng = np.random.default_rng(0)
    for _ in range(120):
        params, opt = step(params, opt, x_train[rng.choice(1500, 32, replace=False)])
    vq = bind(graphdef, params)
    codes = vq.encode(x_test)
    assert codes.shape == (64, 64) and codes.dtype == jnp.int32
    mse = float(jnp.mean((vq.decode(codes) - x_test) ** 2))
    baseline = float(jnp.mean((x_test - x_test.mean()) ** 2))
    assert mse < 0.03 and mse < 0.1 * baseline, (mse, baseline)


def test_missing_imagenet_gives_instructions(tmp_path):
    cfg = DataConfig(name="imagenet2012", data_dir=str(tmp_path / "tfds"),
                     manual_dir=str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="ILSVRC2012_img_train.tar"):
        open_source(cfg, "train")


def test_tfds_source_reads_a_prepared_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")

    class TinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(12):
                img = np.full((40, 60, 3), 20 * i, np.uint8)
                img[:, :4] = 255  # a left border that the center crop removes
                yield i, {"image": img, "label": i % 3}

    source = open_source(DataConfig(name="tiny_images", image_size=16,
                                    data_dir=str(tmp_path)), "train")
    assert source.num_examples == 12 and source.num_classes == 3
    rows = source[np.array([0, 5, 7])]
    assert rows["image"].shape == (3, 16, 16, 3) and rows["image"].dtype == np.uint8
    for img, label in zip(rows["image"], rows["label"]):
        value = int(img[8, 8, 0])
        assert value % 20 == 0 and (value // 20) % 3 == label
        assert np.all(img[:, 2:] == value)  # border cropped away
    copy = pickle.loads(pickle.dumps(source))  # what a grain worker process receives
    np.testing.assert_array_equal(copy[np.array([5, 7])]["image"], rows["image"][1:])
