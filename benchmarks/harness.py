"""What every speed benchmark shares, so that its figures can be checked on another machine.

- `calibrate`: the machine's own limits, measured before the workload: float32 GEMM rate
  (jax and, when installed, torch), read bandwidth at the workload's working-set size (a
  480 MB weight set can sit in a large L3 on one host and stream from DRAM on another), and
  the rate XLA's few-row GEMM reaches on such weights (what memory-bound decoding gets).
- `floor`: the least time a workload can take here, max(bytes / bandwidth, FLOPs / GEMM rate),
  and which of the two binds.
- `interleave`: the compared implementations take turns (the order alternates each round), so
  drift and co-running load hit both; `spread` prints median and min-max.
- `compete`: a busy process on one core for the run, the "shared machine" condition.
- `compiled`: ahead-of-time compilation, timed alone (a first call's time adds one run).
- `kernels`: arjax's CPU kernels on or off while tracing (`--xla-ops` times both).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_s(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compiled(fn: Callable, *args) -> tuple[Callable, float]:
    """(`fn` jitted and compiled for arguments shaped as `args`, the seconds tracing, lowering
    and compiling took): the "compile s" of every table. Call the result with such arguments."""
    t0 = time.perf_counter()
    executable = jax.jit(fn).lower(*args).compile()
    return executable, time.perf_counter() - t0


def compiled_sampler(fn: Callable, *args, warm_up: bool = True
                     ) -> tuple[Callable[[], object], float]:
    """`fn(*args, key)` compiled (`compiled`) and, with `warm_up`, called once with key 0 ->
    (a timed run: the call with key 1, compile seconds)."""
    executable, compile_s = compiled(fn, *args, jax.random.key(0))
    if warm_up:
        jax.block_until_ready(executable(*args, jax.random.key(0)))
    return lambda: jax.block_until_ready(executable(*args, jax.random.key(1))), compile_s


def gemm_rate(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a jitted float32 n x n matmul on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    return 2 * n**3 / median_s(lambda: dot(a, a).block_until_ready(), repeats) / 1e9


def torch_gemm_rate(n: int = 2048, repeats: int = 5) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    a = torch.randn(n, n)
    with torch.inference_mode():
        return 2 * n**3 / median_s(lambda: a @ a, repeats) / 1e9


def read_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """GB/s of reading `nbytes` of float32 with every core (numpy sums release the GIL)."""
    cores = os.cpu_count() or 1
    parts = np.array_split(np.ones(max(nbytes // 4, cores), np.float32), cores)
    with ThreadPoolExecutor(cores) as pool:
        run = lambda: list(pool.map(np.sum, parts))
        return nbytes / median_s(run, repeats) / 1e9


def few_row_gemm_rate(nbytes: int, rows: int = 2, repeats: int = 5) -> float:
    """GB/s of weights streamed by XLA's `[rows, K] @ [K, N]` with `nbytes` of weights."""
    k = 1024
    w = jnp.ones((k, max(nbytes // (4 * k), 1)), jnp.float32)
    x = jnp.ones((rows, k), jnp.float32)
    dot = jax.jit(jnp.dot)
    return w.nbytes / median_s(lambda: dot(x, w).block_until_ready(), repeats) / 1e9


@dataclasses.dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    gemm_gflops: float  # jax float32, 2048^2
    torch_gemm_gflops: float | None
    working_set_mb: float
    read_gbs: float  # at the working-set size, all cores
    few_row_gbs: float  # XLA's 2-row GEMM on that many weights

    def line(self) -> str:
        torch_rate = (f", torch {self.torch_gemm_gflops:.0f}" if self.torch_gemm_gflops
                      else "")
        return (f"machine: {self.cpu}, {self.cores} cores, load {load()}; float32 GEMM "
                f"{self.gemm_gflops:.0f} GFLOP/s (jax{torch_rate}); read bandwidth at "
                f"{self.working_set_mb:.0f} MB {self.read_gbs:.1f} GB/s; XLA 2-row GEMM on "
                f"those weights {self.few_row_gbs:.1f} GB/s")


def calibrate(working_set_bytes: int) -> Machine:
    m = Machine(cpu_name(), os.cpu_count() or 1, gemm_rate(), torch_gemm_rate(),
                working_set_bytes / 1e6, read_bandwidth(working_set_bytes),
                few_row_gemm_rate(working_set_bytes))
    print(m.line(), flush=True)
    return m


def floor(bytes_read: float, flops: float, machine: Machine) -> tuple[float, str]:
    """(seconds, "memory" | "compute"): the least time `bytes_read` and `flops` take here."""
    memory, compute = bytes_read / (machine.read_gbs * 1e9), flops / (machine.gemm_gflops * 1e9)
    return (memory, "memory") if memory >= compute else (compute, "compute")


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def interleave(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each run per round; every run was called once before (warm-up, compile)."""
    times = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def spread(times: list[float]) -> str:
    return f"{statistics.median(times):.2f} s ({min(times):.2f}-{max(times):.2f})"


def against_floor(times: list[float], floor_s: float) -> str:
    """'median s (min-max) = floor xBEST': the best round as a multiple of the floor."""
    return f"{spread(times)} = floor x{min(times) / floor_s:.2f}"


def ratio(slow: list[float], fast: list[float]) -> str:
    """The per-round ratio slow / fast of two interleaved runs: 'xMEDIAN (MIN-MAX)'."""
    r = sorted(s / f for s, f in zip(slow, fast))
    return f"x{statistics.median(r):.2f} ({r[0]:.2f}-{r[-1]:.2f})"


def columns(times: dict[str, list[float]], floor_s: float, arjax_note: str = "",
            decode_floor: float | None = None) -> list[str]:
    """The printed columns of a comparison: each side that ran against the floor (with its
    decoder, timed as '<side> decode', against `decode_floor`), then official / arjax."""
    out = []
    for side in ("arjax", "official"):
        if side in times:
            col = f"{side} {against_floor(times[side], floor_s)}"
            if decode_floor is not None:
                col += f", decode {against_floor(times[side + ' decode'], decode_floor)}"
            out.append(col + (arjax_note if side == "arjax" else ""))
    if "official" in times:
        out.append(f"official / arjax {ratio(times['official'], times['arjax'])}")
    return out


def variant(times: dict[str, list[float]], name: str, compile_s: float | None = None) -> str:
    """The printed column of an arjax variant timed beside 'arjax': its time (and compile
    time), and the per-round ratio variant / arjax."""
    compiled = "" if compile_s is None else f" (compile {compile_s:.1f} s)"
    return (f"{name} {spread(times[name])}{compiled}, {name} / arjax "
            f"{ratio(times[name], times['arjax'])}")


@contextlib.contextmanager
def compete(enabled: bool = True):
    """A process spinning on one core for the duration (the shared-machine condition)."""
    if not enabled:
        yield
        return
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        busy.kill()
        busy.wait()


def matmul_weights(params, skip: tuple[str, ...] = ("embedding",)) -> int:
    """Number of weights in the 2-D kernels every token multiplies (embedding tables, which a
    token only indexes, left out): 2 x this x tokens = the matmul FLOPs of a forward pass."""
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        if getattr(x, "ndim", 0) == 2 and not any(s in name for s in skip):
            total += int(np.prod(x.shape))
    return total


def nbytes(params) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(params))


def add_arguments(parser: argparse.ArgumentParser, rounds: int = 3) -> None:
    """The options every comparison takes: rounds, the competing process, torch's threads and
    compiler."""
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--compete", action="store_true",
                        help="keep one core busy with another process during the runs")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="intra-op threads of the official (torch) side; 0 = torch's default")
    parser.add_argument("--torch-compile", action="store_true",
                        help="torch.compile the official model (fullgraph, as LlamaGen's "
                        "sample_c2i.py --compile; needs a C++ compiler), compiled in its warm-up")
    parser.add_argument("--xla-ops", action="store_true",
                        help="also time arjax with its CPU kernels off (ARJAX_CPU_KERNELS=off: "
                        "XLA's own dot and attention ops)")


def kernels(on: bool):
    """Context in which arjax traces with its CPU kernels (`arjax.nn.cpu_kernels`) on or off:
    enter it around tracing / compiling, which is when the switch is read."""
    return mock.patch.dict(os.environ, ARJAX_CPU_KERNELS="on" if on else "off")


def apply(args: argparse.Namespace) -> None:
    if args.torch_threads:
        import torch
        torch.set_num_threads(args.torch_threads)


def official_module(module, args: argparse.Namespace, **options):
    """The official model as the run asks for it: eager, or `torch.compile`d with `options`
    (default: LlamaGen's sample_c2i.py --compile)."""
    if not args.torch_compile:
        return module
    import torch
    return torch.compile(module, **(options or dict(mode="reduce-overhead", fullgraph=True)))


def condition(args: argparse.Namespace) -> str:
    """How the run was set up, for its printed line."""
    parts = (["one core busy"] if args.compete else []) + (
        [f"torch {args.torch_threads} thread(s)"] if args.torch_threads else []) + (
        ["official torch.compile'd"] if args.torch_compile else [])
    return f" ({', '.join(parts)})" if parts else ""
