"""A weight-streaming few-row matmul for XLA:CPU (a C++ kernel through `jax.ffi`), to measure
how far XLA's own few-row dot is from what this machine can stream: not used by arjax.

Decoding multiplies 2-16 rows by every weight matrix once per step. XLA:CPU's dot packs the
weights on every call (the library's GEMM), reaching a fraction of the read bandwidth at 16
rows (`benchmarks.few_row_gemm`). This kernel takes the weights packed once as
[N / 16, K, 16] (16-column panels, each contiguous: the prefetcher streams it) and keeps 16
rows x 16 columns of accumulators in AVX-512 registers: per k, one 64-byte load of weights and
16 fused multiply-adds with the rows' values broadcast from a transposed copy of x (the
compiled loop is exactly that: one `vmovups` and 16 `vfmadd231ps` with broadcast operands),
prefetching the panel 4 KB ahead.
Two threads split the panels. `build()` compiles it with the system's g++ (-O3 -march=native)
into a temporary directory and registers it; None without a compiler.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

SOURCE = r"""
#include <thread>
#include <cstdint>
#include <vector>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
static constexpr int R = 16;

// Rows r0.. (mb of them, xt = their [K][R] transpose, zero padded) times panels p0..p1 of w.
static void panels(const float* xt, const float* w, float* y, int64_t mb, int64_t K,
                   int64_t N, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* wp = w + p * K * 16;
    v16 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = (v16){};
    for (int64_t k = 0; k < K; ++k) {
      __builtin_prefetch(wp + (k + 64) * 16);
      v16 wv = *reinterpret_cast<const v16u*>(wp + k * 16);
      const float* xk = xt + k * R;
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) acc[i] += xk[i] * wv;
    }
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i)
      if (i < mb) *reinterpret_cast<v16u*>(y + i * N + p * 16) = acc[i];
  }
}

static ffi::Error Rows(ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  int64_t M = x.dimensions()[0], K = x.dimensions()[1], P = w.dimensions()[0], N = P * 16;
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* yp = y->typed_data();
  int64_t half = std::thread::hardware_concurrency() > 1 ? P / 2 : 0;
  std::vector<float> xt(K * R);
  for (int64_t r0 = 0; r0 < M; r0 += R) {
    int64_t mb = M - r0 < R ? M - r0 : R;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < R; ++i) xt[k * R + i] = i < mb ? xp[(r0 + i) * K + k] : 0.0f;
    const float* xtp = xt.data();
    float* yr = yp + r0 * N;
    std::thread other;
    if (half > 0) other = std::thread([=] { panels(xtp, wp, yr, mb, K, N, half, P); });
    panels(xtp, wp, yr, mb, K, N, 0, half > 0 ? half : P);
    if (half > 0) other.join();
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PackedRows, Rows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
"""


def pack(w: jax.Array) -> jax.Array:
    """[K, N] weights (N a multiple of 16) -> [N / 16, K, 16] panels."""
    k, n = w.shape
    return w.reshape(k, n // 16, 16).transpose(1, 0, 2)


def build():
    """-> `rows(x [M, K], packed [N / 16, K, 16]) -> [M, N]` (jittable), or None without g++."""
    if shutil.which("g++") is None:
        return None
    folder = tempfile.mkdtemp(prefix="arjax-packed-rows-")
    source, library = os.path.join(folder, "rows.cc"), os.path.join(folder, "rows.so")
    with open(source, "w") as f:
        f.write(SOURCE)
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w"]
    subprocess.run(["g++", *flags, f"-I{jax.ffi.include_dir()}", source, "-o", library],
                   check=True)
    handler = ctypes.cdll.LoadLibrary(library).PackedRows
    jax.ffi.register_ffi_target("arjax_packed_rows", jax.ffi.pycapsule(handler),
                                platform="cpu")

    def rows(x, packed):
        out = jax.ShapeDtypeStruct((x.shape[0], packed.shape[0] * 16), jnp.float32)
        return jax.ffi.ffi_call("arjax_packed_rows", out)(x, packed)

    return rows
