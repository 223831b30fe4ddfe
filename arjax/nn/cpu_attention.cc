// Fused float32 attention for XLA:CPU (arjax.nn.cpu_attention): softmax(q k^T, masked) v and
// its gradient, one block of query rows at a time, so the [rows, keys] logits live in a
// per-thread buffer (L2-sized) instead of being written and read back whole.
//
// Layout: q / out / dout [G][M][D] (G = batch x kv heads, M = query rows, q already scaled),
// k / v / dk / dv [G][S][D], mask uint8 [Bm][T][S] (Bm 1 or the batch; row m of group g is
// query t = m % T of batch g / (G / B)), D a multiple of 16. A masked logit is -1e30, as in
// arjax.nn.attention.attend, so a row with no visible key is uniform over all keys; keys past
// a block's last visible one are skipped. Dropout (rate > 0) zeroes a probability where a
// hash of (seed, group, row, key) falls below rate x 2^32 and scales the rest by 1 / (1 -
// rate); the backward pass recomputes the same keep pattern.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
static constexpr int64_t ROWS = 24;  // query rows per block
static constexpr float MASKED = -1e30f;

// C[MR x 16 NV] (+)= A[MR x K] B[K x 16 NV]; A(i, k) = A[i * ars + k * acs], B row-major.
template <int MR, int NV>
static inline void tile(int64_t K, const float* A, int64_t ars, int64_t acs, const float* B,
                        int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  v16 c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      c[i][v] = accumulate ? *reinterpret_cast<const v16u*>(C + i * ldc + 16 * v) : (v16){};
  for (int64_t k = 0; k < K; ++k) {
    v16 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const v16u*>(B + k * ldb + 16 * v);
    for (int i = 0; i < MR; ++i) {
      float a = A[i * ars + k * acs];
      for (int v = 0; v < NV; ++v) c[i][v] += a * b[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<v16u*>(C + i * ldc + 16 * v) = c[i][v];
}

template <int NV>
static void column_block(int64_t M, int64_t K, const float* A, int64_t ars, int64_t acs,
                         const float* B, int64_t ldb, float* C, int64_t ldc, bool acc) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) tile<6, NV>(K, A + i * ars, ars, acs, B, ldb, C + i * ldc, ldc, acc);
  const float* a = A + i * ars;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: tile<5, NV>(K, a, ars, acs, B, ldb, c, ldc, acc); break;
    case 4: tile<4, NV>(K, a, ars, acs, B, ldb, c, ldc, acc); break;
    case 3: tile<3, NV>(K, a, ars, acs, B, ldb, c, ldc, acc); break;
    case 2: tile<2, NV>(K, a, ars, acs, B, ldb, c, ldc, acc); break;
    case 1: tile<1, NV>(K, a, ars, acs, B, ldb, c, ldc, acc); break;
  }
}

static int64_t up16(int64_t n) { return (n + 15) / 16 * 16; }

// C[M x N] (+)= A[M x K] B[K x N], N a multiple of 16.
static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ars, int64_t acs,
                 const float* B, int64_t ldb, float* C, int64_t ldc, bool acc) {
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) column_block<4>(M, K, A, ars, acs, B + j, ldb, C + j, ldc, acc);
  for (; j < N; j += 16) column_block<1>(M, K, A, ars, acs, B + j, ldb, C + j, ldc, acc);
}

struct Dropout {
  uint64_t seed;
  uint32_t threshold;  // drop where the hash < threshold
  float scale;         // 1 / (1 - rate)
  bool on;

  Dropout(ffi::Buffer<ffi::U32> seed_, float rate) {
    const uint32_t* s = seed_.typed_data();
    seed = (uint64_t(s[0]) << 32) | s[1];
    on = rate > 0.0f;
    threshold = uint32_t(std::min(double(rate) * 4294967296.0, 4294967295.0));
    scale = on ? 1.0f / (1.0f - rate) : 1.0f;
  }
  // The factor (0 or scale) of entry `index` = (group x rows + row) x keys + key.
  float factor(uint64_t index) const {
    uint64_t x = seed ^ (index * 0x9E3779B97F4A7C15ull);  // splitmix64's finaliser
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return uint32_t((x ^ (x >> 31)) >> 32) < threshold ? 0.0f : scale;
  }
};

struct Problem {
  int64_t G, M, S, D, T, Bm, per_batch, padded;  // padded: S rounded up to 16
  const float *q, *k, *v;
  const uint8_t* mask;
  std::vector<int64_t> row_end;  // [Bm][T]: one past the last visible key (S if none)

  Problem(ffi::Buffer<ffi::F32> q_, ffi::Buffer<ffi::F32> k_, ffi::Buffer<ffi::F32> v_,
          ffi::Buffer<ffi::U8> mask_, int64_t batch) {
    G = q_.dimensions()[0], M = q_.dimensions()[1], D = q_.dimensions()[2];
    S = k_.dimensions()[1], Bm = mask_.dimensions()[0], T = mask_.dimensions()[1];
    per_batch = G / batch, padded = up16(S);
    q = q_.typed_data(), k = k_.typed_data(), v = v_.typed_data(), mask = mask_.typed_data();
    row_end.assign(Bm * T, S);
    for (int64_t r = 0; r < Bm * T; ++r) {
      const uint8_t* m = mask + r * S;
      int64_t end = S;
      while (end > 0 && !m[end - 1]) --end;
      row_end[r] = end > 0 ? end : S;
    }
  }
  const uint8_t* mask_row(int64_t g, int64_t m) const {
    return mask + ((Bm == 1 ? 0 : g / per_batch) * T + m % T) * S;
  }
  int64_t end_of(int64_t g, int64_t m) const {
    return row_end[(Bm == 1 ? 0 : g / per_batch) * T + m % T];
  }
  // x [S][D] of group g -> xt [D][padded], zero columns past S.
  void transpose(const float* x, float* xt) const {
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t s = 0; s < S; ++s) xt[d * padded + s] = x[s * D + d];
      for (int64_t s = S; s < padded; ++s) xt[d * padded + s] = 0.0f;
    }
  }
  // Rows m0..m0+rows of group g: p [rows][padded] = their softmax over keys < end (returned,
  // the largest row_end of the block); logits from q and kt.
  int64_t softmax(int64_t g, int64_t m0, int64_t rows, const float* kt, float* p) const {
    int64_t end = 0;
    for (int64_t i = 0; i < rows; ++i) end = std::max(end, end_of(g, m0 + i));
    int64_t cols = up16(end);
    gemm(rows, cols, D, q + (g * M + m0) * D, D, 1, kt, padded, p, padded, false);
    for (int64_t i = 0; i < rows; ++i) {
      float* row = p + i * padded;
      const uint8_t* visible = mask_row(g, m0 + i);
      float top = MASKED;
      for (int64_t j = 0; j < end; ++j) {
        if (!visible[j]) row[j] = MASKED;
        top = std::max(top, row[j]);
      }
      // Keys past this row's own end are masked too (exp underflows to 0), except in a row
      // with no visible key, which spans every key.
      float total = 0.0f;
      for (int64_t j = 0; j < end; ++j) total += (row[j] = std::exp(row[j] - top));
      float inv = 1.0f / total;
      for (int64_t j = 0; j < end; ++j) row[j] *= inv;
      for (int64_t j = end; j < cols; ++j) row[j] = 0.0f;
    }
    return end;
  }
  uint64_t entry(int64_t g, int64_t m) const { return uint64_t(g * M + m) * S; }
};

template <typename F>
static void over_groups(int64_t G, F work) {
  int64_t threads = std::min<int64_t>(G, std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t)
    pool.emplace_back([=] { work(G * t / threads, G * (t + 1) / threads); });
  work(0, G / threads);
  for (auto& t : pool) t.join();
}

static ffi::Error Forward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::U8> mask,
                          ffi::Buffer<ffi::U32> seed, int64_t batch, float rate,
                          ffi::ResultBuffer<ffi::F32> out) {
  const Problem P(q, k, v, mask, batch);
  const Dropout drop(seed, rate);
  float* o = out->typed_data();
  over_groups(P.G, [&](int64_t g0, int64_t g1) {
    std::vector<float> kt(P.D * P.padded), p(ROWS * P.padded);
    for (int64_t g = g0; g < g1; ++g) {
      P.transpose(P.k + g * P.S * P.D, kt.data());
      for (int64_t m0 = 0; m0 < P.M; m0 += ROWS) {
        int64_t rows = std::min(ROWS, P.M - m0);
        int64_t end = P.softmax(g, m0, rows, kt.data(), p.data());
        for (int64_t i = 0; drop.on && i < rows; ++i)
          for (int64_t j = 0, at = P.entry(g, m0 + i); j < end; ++j)
            p[i * P.padded + j] *= drop.factor(at + j);
        gemm(rows, P.D, end, p.data(), P.padded, 1, P.v + g * P.S * P.D, P.D,
             o + (g * P.M + m0) * P.D, P.D, false);
      }
    }
  });
  return ffi::Error::Success();
}

static ffi::Error Backward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::U8> mask,
                           ffi::Buffer<ffi::U32> seed, ffi::Buffer<ffi::F32> out,
                           ffi::Buffer<ffi::F32> dout, int64_t batch, float rate,
                           ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                           ffi::ResultBuffer<ffi::F32> dv) {
  const Problem P(q, k, v, mask, batch);
  const Dropout drop(seed, rate);
  const float *o = out.typed_data(), *dO = dout.typed_data();
  float *dQ = dq->typed_data(), *dK = dk->typed_data(), *dV = dv->typed_data();
  over_groups(P.G, [&](int64_t g0, int64_t g1) {
    std::vector<float> kt(P.D * P.padded), vt(P.D * P.padded), p(ROWS * P.padded),
        dp(ROWS * P.padded);
    for (int64_t g = g0; g < g1; ++g) {
      const float *kg = P.k + g * P.S * P.D, *vg = P.v + g * P.S * P.D;
      float *dkg = dK + g * P.S * P.D, *dvg = dV + g * P.S * P.D;
      P.transpose(kg, kt.data());
      P.transpose(vg, vt.data());
      std::memset(dkg, 0, sizeof(float) * P.S * P.D);
      std::memset(dvg, 0, sizeof(float) * P.S * P.D);
      for (int64_t m0 = 0; m0 < P.M; m0 += ROWS) {
        int64_t rows = std::min(ROWS, P.M - m0), at = (g * P.M + m0) * P.D;
        int64_t end = P.softmax(g, m0, rows, kt.data(), p.data());
        int64_t cols = up16(end);
        // With F the dropout factors: dP = F dO V^T, dS = P (dP - rowsum(dO * O)) at
        // visible keys (written over dP), then F P over P.
        gemm(rows, cols, P.D, dO + at, P.D, 1, vt.data(), P.padded, dp.data(), P.padded, false);
        for (int64_t i = 0; i < rows; ++i) {
          float s = 0.0f;
          for (int64_t d = 0; d < P.D; ++d) s += dO[at + i * P.D + d] * o[at + i * P.D + d];
          float *ds = dp.data() + i * P.padded, *pi = p.data() + i * P.padded;
          const uint8_t* visible = P.mask_row(g, m0 + i);  // a masked logit is a constant
          if (!drop.on) {
            for (int64_t j = 0; j < end; ++j) ds[j] = visible[j] ? pi[j] * (ds[j] - s) : 0.0f;
            continue;
          }
          for (int64_t j = 0, e = P.entry(g, m0 + i); j < end; ++j) {
            float f = drop.factor(e + j);
            ds[j] = visible[j] ? pi[j] * (f * ds[j] - s) : 0.0f;
            pi[j] *= f;
          }
        }
        // dV += (F P)^T dO, dK += dS^T Q, dQ = dS K.
        gemm(end, P.D, rows, p.data(), 1, P.padded, dO + at, P.D, dvg, P.D, true);
        gemm(end, P.D, rows, dp.data(), 1, P.padded, P.q + at, P.D, dkg, P.D, true);
        gemm(rows, P.D, end, dp.data(), P.padded, 1, kg, P.D, dQ + at, P.D, false);
      }
    }
  });
  return ffi::Error::Success();
}

// The operands both passes take first: q, k, v, mask, dropout seed.
static auto Operands() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::U8>>()
      .Arg<ffi::Buffer<ffi::U32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttentionForward, Forward,
                              Operands()
                                  .Attr<int64_t>("batch")
                                  .Attr<float>("rate")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttentionBackward, Backward,
                              Operands()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Attr<int64_t>("batch")
                                  .Attr<float>("rate")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
