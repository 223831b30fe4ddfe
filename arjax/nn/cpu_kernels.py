"""arjax's C++ kernels for XLA:CPU: built with the system's g++ the first time they are
needed (then kept in `cache_folder()`), registered through `jax.ffi`, used only where
`wanted()` says so.

Why hand-written kernels: on a 2-core Xeon XLA:CPU repacks the weights of every few-row matmul
(`nn.few_rows`) and writes attention's whole logit matrix out and back (`nn.cpu_attention`);
both cost arjax its lead over the official PyTorch code (docs/benchmarks.md, issue 14).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
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


def cache_folder() -> str:
    """Where built kernels are kept between processes: `ARJAX_KERNEL_CACHE`, else
    $XDG_CACHE_HOME (or ~/.cache)/arjax/kernels."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("ARJAX_KERNEL_CACHE") or os.path.join(base, "arjax", "kernels")


def library_path(name: str, source: str, flags: tuple[str, ...] = ()) -> str:
    """Where `build` keeps the library: `cache_folder()`/`name`-<hash of the source, the
    compiler command and version, and this CPU's features> (-march=native code runs only on
    CPUs like the one that built it)."""
    digest = hashlib.sha256("\0".join([source, *_command(flags)]).encode())
    version = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    digest.update(version.encode())
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        digest.update(next((line for line in f if line.startswith("flags")), "").encode())
    return os.path.join(cache_folder(), f"{name}-{digest.hexdigest()[:16]}.so")


def _command(flags: tuple[str, ...]) -> list[str]:
    return ["g++", *FLAGS, *flags, f"-I{jax.ffi.include_dir()}"]


@functools.cache
def build(name: str, source: str, targets: tuple[tuple[str, str], ...],
          flags: tuple[str, ...] = ()) -> bool:
    """Registers each (symbol, target) handler of `source` (C++ against XLA's FFI headers;
    `flags` beside `FLAGS`) for the CPU, compiling it unless `cache_folder()` holds it;
    False, with a warning, without g++ or when it fails to build."""
    if jax.default_backend() != "cpu" or shutil.which("g++") is None:
        return False
    library = library_path(name, source, flags)
    if not os.path.exists(library):
        with tempfile.TemporaryDirectory(prefix="arjax-kernels-") as scratch:
            path, built_path = os.path.join(scratch, f"{name}.cc"), os.path.join(scratch, "k.so")
            with open(path, "w") as f:
                f.write(source)
            built = subprocess.run([*_command(flags), path, "-o", built_path],
                                   capture_output=True, text=True)
            if built.returncode != 0:
                warnings.warn(f"arjax: the CPU kernel {name} did not build; XLA's own ops are "
                              f"used instead ({built.stderr.strip().splitlines()[-1:]})",
                              stacklevel=2)
                return False
            try:  # atomic: processes building at once each rename a whole library
                folder, file = os.path.split(library)
                os.makedirs(folder, exist_ok=True)
                staged = os.path.join(folder, f".{os.getpid()}-{file}")
                shutil.copyfile(built_path, staged)
                os.replace(staged, library)
            except OSError:  # an unwritable cache: load this process's own build
                library = os.path.join(tempfile.mkdtemp(prefix="arjax-kernels-"), "k.so")
                shutil.copyfile(built_path, library)
    handlers = ctypes.cdll.LoadLibrary(library)
    for symbol, target in targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handlers, symbol)),
                                    platform="cpu")
    return True
