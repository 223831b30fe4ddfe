"""8 simulated CPU devices (set before JAX starts) and tiny-model factories."""

import os
import tempfile

# Tests are compile-bound: LLVM's optimisation passes cost them more compile time than the
# faster code saves (the suites run 2.5-3x faster without), so tests compile with them off.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {FAST_COMPILE}"
                           " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The digits evaluator is trained once (deterministically) and cached here for all tests.
os.environ.setdefault("ARJAX_CACHE", os.path.join(tempfile.gettempdir(), "arjax-test-cache"))
# The entry points' persistent compilation cache stays off: tests are not to share executables.
os.environ["ARJAX_COMPILATION_CACHE"] = "off"

import jax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from arjax.models import split  # noqa: E402
from arjax.models.raster_ar import RasterAR, RasterARConfig  # noqa: E402


def tiny_gpt_config(**overrides) -> RasterARConfig:
    base = dict(vocab_size=16, grid=3, num_classes=4, dim=32, depth=2, heads=2,
                multiple_of=8, dropout=0.0, label_drop=0.0)
    return RasterARConfig(**{**base, **overrides})


def tiny_gpt(seed: int = 0, scale: float = 0.3, **overrides):
    """(graphdef, params) with all weights randomised (the zero-init head would hide bugs)."""
    graphdef, params = split(RasterAR(tiny_gpt_config(**overrides), rngs=nnx.Rngs(seed)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return graphdef, jax.tree.unflatten(tree, leaves)


@pytest.fixture
def no_compilation(monkeypatch):
    """Fails the test if anything reaches jax.jit (bad input must be caught before). The
    experiments are imported first: their modules jit-decorate functions at import, which
    compiles nothing."""
    import importlib
    import pkgutil

    import experiments
    for module in pkgutil.iter_modules(experiments.__path__):
        importlib.import_module(f"experiments.{module.name}")

    def refuse(*args, **kwargs):
        raise AssertionError("compilation started before the input was validated")
    monkeypatch.setattr(jax, "jit", refuse)


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) == 8, "conftest must run before JAX initialises"
    return jax.devices()


def official_shapes(module_fn, name_of) -> dict:
    """Official checkpoint key -> shape for a module, from abstract params (nothing is
    allocated, so 3B-parameter tables are instant); `name_of` is a converter's name map."""
    import numpy as np

    from arjax.convert.torch_io import INVERSE, abstract_params
    from arjax.sharding import path_str

    abstract = abstract_params(module_fn)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        key, transform = name_of(path_str(path), tuple(leaf.shape))
        out[key] = INVERSE[transform](np.empty(leaf.shape, np.int8)).shape
    return out


def random_params(module_fn, seed: int, scale: float = 1.0):
    """Params of the module `module_fn` builds, all N(0, scale^2), drawn in numpy from the
    abstract shapes: instant, where a (jitted) init of a conv VAE compiles for ~30 s."""
    import numpy as np

    from arjax.convert.torch_io import abstract_params

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (rng.normal(size=a.shape) * scale).astype(np.float32),
                        abstract_params(module_fn))
