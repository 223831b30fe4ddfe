"""JAX's persistent compilation cache for the command-line entry points.

A rerun of an experiment (a resume after a crash or preemption, sampling again with other
seeds, an evaluation) compiles the same programs with the same shapes; with the cache on,
every process after the first loads those executables from disk instead of compiling them
again (`benchmarks/compile_cache.py` measures what it saves). The experiments' command line
and `python -m arjax.evaluate` turn it on; the library alone never writes to disk.

`ARJAX_COMPILATION_CACHE=<dir>` chooses the directory (default `~/.cache/arjax/xla`; a
shared path works for a pod, JAX writes entries atomically), `off` turns it off, and a
directory already set in JAX's own `jax_compilation_cache_dir` is kept.
"""

from __future__ import annotations

import os

import jax

DEFAULT_DIR = os.path.join("~", ".cache", "arjax", "xla")
OFF = ("off", "0", "")


def enable(environ=os.environ) -> str | None:
    """Turns the cache on (see module doc) -> its directory, or None when off."""
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = environ.get("ARJAX_COMPILATION_CACHE", DEFAULT_DIR)
    if path.lower() in OFF:
        return None
    path = os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", path)
    return path
