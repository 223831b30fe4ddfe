"""The entry points' persistent compilation cache: the environment chooses it, and a second
process loads what the first compiled."""

import os
import subprocess
import sys

import jax

from arjax import compilation_cache

PROBE = """
import jax, jax.numpy as jnp
from arjax import compilation_cache
hits = []
jax.monitoring.register_event_listener(lambda name, **_: hits.append(name))
path = compilation_cache.enable()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
print(path, hits.count("/jax/compilation_cache/cache_hits"))
"""


def test_environment_chooses_the_directory(tmp_path):
    assert jax.config.jax_compilation_cache_dir is None  # conftest: off in the tests
    try:
        assert compilation_cache.enable({"ARJAX_COMPILATION_CACHE": "off"}) is None
        assert jax.config.jax_compilation_cache_dir is None
        assert compilation_cache.enable({"ARJAX_COMPILATION_CACHE": str(tmp_path)}) == str(
            tmp_path)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path)
        # a directory set in JAX's own config is kept
        assert compilation_cache.enable({"ARJAX_COMPILATION_CACHE": "/elsewhere"}) == str(
            tmp_path)
    finally:
        jax.config.update("jax_compilation_cache_dir", None)


def test_second_process_loads_what_the_first_compiled(tmp_path):
    env = {**os.environ, "ARJAX_COMPILATION_CACHE": str(tmp_path / "xla")}
    runs = [subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                           text=True, check=True).stdout.split() for _ in range(2)]
    assert runs[0] == [str(tmp_path / "xla"), "0"]
    assert os.listdir(tmp_path / "xla")
    assert runs[1][0] == str(tmp_path / "xla") and int(runs[1][1]) >= 1
