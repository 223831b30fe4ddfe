"""Few-row matmuls for decoding on XLA:CPU: a C++ kernel (through `jax.ffi`) on weights packed
once per sampler call.

Why: a decoding step multiplies 2 x batch rows by every weight matrix. At 8-16 rows XLA:CPU's
dot packs the weights again on every call and streamed about 5-6 GB/s of them on a 2-core Xeon
(`benchmarks.few_row_gemm`), where this kernel, reading 16-column panels laid out contiguously
once (`pack`), streams about 9 GB/s: GPT-B's batch-8 sampling went from 18.2 to 14.9 s with the
same tokens (docs/benchmarks.md). At 1-2 rows XLA's own matrix-vector path is faster, so the
sampler packs only for 8-16 rows (`decode_params`).

The kernel keeps 16 rows x 16 columns of float32 accumulators in AVX-512 registers (one
64-byte weight load and 16 broadcast FMAs per k, prefetching 4 KB ahead) and splits the panels
over two threads. It is built by `nn.cpu_kernels` the first time a process needs it; where
`cpu_kernels.wanted()` says no or it cannot be built, nothing is packed and XLA's dot runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from arjax.nn import cpu_kernels

PANEL = 16  # columns per packed panel
ROWS = (8, 16)  # rows (2 x batch with CFG) for which decoding packs its weights
MIN_WEIGHTS = 1 << 20  # smaller matrices stay with XLA (tiny models, tests)

SOURCE = r"""
#include <cstdint>
#include <thread>
#include <vector>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
static constexpr int R = 16;

// mb rows (xt: their [K][R] transpose, zero padded) times panels p0..p1 of w [P][K][16].
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

static ffi::Error Rows(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(FewRows, Rows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
"""

TARGET = "arjax_few_rows"


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered in this process (built on the first call)."""
    return cpu_kernels.build("few_rows", SOURCE, (("FewRows", TARGET),))


def pack(w: jax.Array) -> jax.Array:
    """[K, N] weights (N a multiple of 16) -> [N / 16, K, 16]: each 16-column panel
    contiguous."""
    k, n = w.shape
    return w.reshape(k, n // PANEL, PANEL).transpose(1, 0, 2)


def unpack(panels: jax.Array) -> jax.Array:
    """The inverse of `pack`."""
    p, k, _ = panels.shape
    return panels.transpose(1, 0, 2).reshape(k, p * PANEL)


def matmul(x: jax.Array, panels: jax.Array) -> jax.Array:
    """x [M, K] @ the packed weights -> [M, N] float32: the kernel for up to 16 rows, XLA's
    dot on the unpacked weights for more (a prefill)."""
    if x.shape[0] > max(ROWS):
        return x @ unpack(panels)
    out = jax.ShapeDtypeStruct((x.shape[0], panels.shape[0] * PANEL), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x.astype(jnp.float32), panels)


def decode_params(params, rows: int, dtype: str):
    """The parameters a cached decode of `rows` rows runs on: float32 dense kernels of at
    least `MIN_WEIGHTS` entries packed for `matmul` (which `nn.layers.Linear` then uses) when
    the model computes in float32 (`dtype`: the kernel is float32), rows is in `ROWS`, the
    kernel is available and `cpu_kernels.wanted()` (read when the sampler is traced);
    otherwise `params` unchanged. Call it inside the jitted sampler, outside the token
    loop: the packing is one pass over the weights per call, and the call holds the packed
    copy beside the weights."""
    if dtype != "float32" or rows not in ROWS or not cpu_kernels.wanted():
        return params
    packable = lambda path, a: (jax.tree_util.keystr(path).endswith("['kernel']")
                                and a.ndim == 2 and a.dtype == jnp.float32
                                and a.shape[1] % PANEL == 0 and a.size >= MIN_WEIGHTS)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not any(packable(path, a) for path, a in leaves) or not available():
        return params  # the kernel is built only when something would use it
    return jax.tree_util.tree_map_with_path(
        lambda path, a: pack(a) if packable(path, a) else a, params)
