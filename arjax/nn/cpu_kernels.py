"""arjax's C++ kernels for XLA:CPU: built with the system's g++ the first time a process
needs one, registered through `jax.ffi`, used only where `wanted()` says so.

Why hand-written kernels: on a 2-core Xeon XLA:CPU repacks the weights of every few-row matmul
(`nn.few_rows`) and writes attention's whole logit matrix out and back (`nn.cpu_attention`);
both cost arjax its lead over the official PyTorch code (docs/benchmarks.md, issue 14).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
import warnings

import jax

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")


def wanted() -> bool:
    """Whether a traced computation may call a kernel: the CPU backend, `ARJAX_CPU_KERNELS`
    not `off` (read at trace time) and no multi-device mesh in context (the kernels have no
    sharding rule)."""
    return (jax.default_backend() == "cpu"
            and os.environ.get("ARJAX_CPU_KERNELS", "on") != "off"
            and jax.sharding.get_abstract_mesh().size <= 1)


@functools.cache
def build(name: str, source: str, targets: tuple[tuple[str, str], ...],
          flags: tuple[str, ...] = ()) -> bool:
    """Compiles `source` (C++ against XLA's FFI headers; `flags` beside `FLAGS`) into a
    temporary directory and registers each (symbol, target) handler for the CPU; False, with
    a warning, without g++ or when it fails to build."""
    if jax.default_backend() != "cpu" or shutil.which("g++") is None:
        return False
    folder = tempfile.mkdtemp(prefix="arjax-kernels-")
    path, library = os.path.join(folder, f"{name}.cc"), os.path.join(folder, f"{name}.so")
    with open(path, "w") as f:
        f.write(source)
    command = ["g++", *FLAGS, *flags, f"-I{jax.ffi.include_dir()}", path, "-o", library]
    built = subprocess.run(command, capture_output=True, text=True)
    if built.returncode != 0:
        warnings.warn(f"arjax: the CPU kernel {name} did not build; XLA's own ops are used "
                      f"instead ({built.stderr.strip().splitlines()[-1:]})", stacklevel=2)
        return False
    handlers = ctypes.cdll.LoadLibrary(library)
    for symbol, target in targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handlers, symbol)),
                                    platform="cpu")
    return True
