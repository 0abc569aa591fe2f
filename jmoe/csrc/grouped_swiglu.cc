// Grouped SwiGLU experts for XLA:CPU, called as an XLA FFI custom call
// (jmoe/cpu_gmm.py builds this file on first use and registers it).
//
// Shape letters: T tokens, D model dim, F expert ffn dim, E experts, A assignments.
// Inputs (assignments already sorted by expert, the live ones first):
//   x       f32[T, D]   token rows
//   tok     s32[A]      token row of each sorted assignment
//   dst     s32[A]      where its output goes (its index in the unsorted order)
//   weight  f32[A]      combine weight of each sorted assignment
//   counts  s32[E]      live assignments per expert: expert e owns the next counts[e] rows
//   w_gate  f32[E, D, F], w_up f32[E, D, F], w_down f32[E, F, D]
// Output:
//   y       f32[A, D]   y[dst[i]] = weight[i] * down(silu(x[tok[i]] @ gate) * (x[tok[i]] @ up))
//                       for the live rows; zero rows for the rest (dropped assignments).
//
// Why: on XLA:CPU the static-shape alternatives pad every expert to a common
// capacity and pay a fixed cost per batched dot; here each expert computes exactly
// its own rows. Work is split into tasks of up to kRowsPerTask rows of one expert,
// shared by XLA's intra-op thread pool and the calling thread.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Register tile: kMR rows x kNR columns of C held in vector registers.
#if defined(__AVX512F__)
constexpr int kMR = 8, kNR = 32;  // 16 zmm accumulators
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kMR = 6, kNR = 16;  // 12 ymm accumulators
#else
constexpr int kMR = 4, kNR = 16;  // plain loops; the compiler vectorises what it can
#endif
constexpr int kRowsPerTask = 48;

// C[M x kNR] = A[M x K] * B[K x kNR]; row strides lda, ldb, ldc (in floats).
template <int M>
inline void Tile(int K, const float* __restrict A, int lda, const float* __restrict B, int ldb,
                 float* __restrict C, int ldc) {
#if defined(__AVX512F__)
  __m512 c0[M], c1[M];
  for (int i = 0; i < M; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const float* b = B + static_cast<int64_t>(k) * ldb;
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
    for (int i = 0; i < M; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * lda + k]);
      c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
    }
  }
  for (int i = 0; i < M; ++i) {
    _mm512_storeu_ps(C + i * ldc, c0[i]);
    _mm512_storeu_ps(C + i * ldc + 16, c1[i]);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 c0[M], c1[M];
  for (int i = 0; i < M; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const float* b = B + static_cast<int64_t>(k) * ldb;
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    for (int i = 0; i < M; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + i * lda + k);
      c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
    }
  }
  for (int i = 0; i < M; ++i) {
    _mm256_storeu_ps(C + i * ldc, c0[i]);
    _mm256_storeu_ps(C + i * ldc + 8, c1[i]);
  }
#else
  float c[M][kNR] = {};
  for (int k = 0; k < K; ++k) {
    const float* b = B + static_cast<int64_t>(k) * ldb;
    for (int i = 0; i < M; ++i) {
      const float a = A[i * lda + k];
      for (int j = 0; j < kNR; ++j) c[i][j] += a * b[j];
    }
  }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < kNR; ++j) C[i * ldc + j] = c[i][j];
#endif
}

template <int M = kMR>
inline void TileRows(int m, int K, const float* A, int lda, const float* B, int ldb, float* C,
                     int ldc) {
  if constexpr (M > 0) {
    if (m == M) return Tile<M>(K, A, lda, B, ldb, C, ldc);
    return TileRows<M - 1>(m, K, A, lda, B, ldb, C, ldc);
  }
}

// C[m x N] = A[m x K] * B[K x N], all row-major; columns past the last full tile in scalar loops.
void Gemm(int m, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
  int n0 = 0;
  for (; n0 + kNR <= N; n0 += kNR)
    for (int i = 0; i < m; i += kMR)
      TileRows(std::min(kMR, m - i), K, A + static_cast<int64_t>(i) * lda, lda, B + n0, ldb,
               C + static_cast<int64_t>(i) * ldc + n0, ldc);
  for (; n0 < N; ++n0)
    for (int i = 0; i < m; ++i) {
      float s = 0.f;
      for (int k = 0; k < K; ++k)
        s += A[static_cast<int64_t>(i) * lda + k] * B[static_cast<int64_t>(k) * ldb + n0];
      C[static_cast<int64_t>(i) * ldc + n0] = s;
    }
}

// exp(x) as 2^n * p(r) with |r| <= ln2/2 and a degree-6 polynomial (Cephes expf
// coefficients, ~1 ulp); plain arithmetic so the SiLU loop vectorises (std::exp
// does not, and would cost more than the matmuls).
inline float Exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) << 23;
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

struct Task {
  int expert, row0, rows;
};

struct Problem {
  int D, F;
  const float *x, *weight, *w_gate, *w_up, *w_down;
  const int32_t *tok, *dst;
  float* y;
};

// One task: gather its rows, gate and up, SiLU(gate) * up, down, weighted scatter.
void RunTask(const Task& t, const Problem& p, float* scratch) {
  const int D = p.D, F = p.F, m = t.rows;
  float* xs = scratch;                    // [rows, D]
  float* gate = xs + kRowsPerTask * D;    // [rows, F]
  float* up = gate + kRowsPerTask * F;    // [rows, F]
  float* out = up + kRowsPerTask * F;     // [rows, D]
  for (int i = 0; i < m; ++i)
    std::memcpy(xs + static_cast<int64_t>(i) * D, p.x + static_cast<int64_t>(p.tok[t.row0 + i]) * D,
                sizeof(float) * D);
  const int64_t e = t.expert;
  Gemm(m, F, D, xs, D, p.w_gate + e * D * F, F, gate, F);
  Gemm(m, F, D, xs, D, p.w_up + e * D * F, F, up, F);
  const int64_t mf = static_cast<int64_t>(m) * F;
  for (int64_t i = 0; i < mf; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.f + Exp(-g)) * up[i];
  }
  Gemm(m, D, F, gate, F, p.w_down + e * F * D, D, out, D);
  for (int i = 0; i < m; ++i) {
    const float w = p.weight[t.row0 + i];
    const float* src = out + static_cast<int64_t>(i) * D;
    float* y = p.y + static_cast<int64_t>(p.dst[t.row0 + i]) * D;
    for (int j = 0; j < D; ++j) y[j] = w * src[j];
  }
}

ffi::Error Invalid(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jmoe_grouped_swiglu: " + what);
}

ffi::Error GroupedSwiGLU(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> tok,
                         ffi::Buffer<ffi::S32> dst, ffi::Buffer<ffi::F32> weight,
                         ffi::Buffer<ffi::S32> counts, ffi::Buffer<ffi::F32> w_gate,
                         ffi::Buffer<ffi::F32> w_up, ffi::Buffer<ffi::F32> w_down,
                         ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), gd = w_gate.dimensions(), ud = w_up.dimensions(),
             dd = w_down.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || gd.size() != 3 || ud.size() != 3 || dd.size() != 3 || yd.size() != 2)
    return Invalid("expected x [T, D], weights [E, D, F], [E, D, F], [E, F, D] and y [A, D]");
  const int64_t T = xd[0], D = xd[1], E = gd[0], F = gd[2], A = tok.element_count();
  if (gd[1] != D || ud[0] != E || ud[1] != D || ud[2] != F || dd[0] != E || dd[1] != F ||
      dd[2] != D)
    return Invalid("expert weight shapes disagree with x [T, D] and w_gate [E, D, F]");
  if (dst.element_count() != A || weight.element_count() != A || counts.element_count() != E ||
      yd[0] != A || yd[1] != D)
    return Invalid("tok, dst, weight must be [A], counts [E] and y [A, D]");
  const int32_t* cnt = counts.typed_data();
  const int32_t *ptok = tok.typed_data(), *pdst = dst.typed_data();
  auto tasks = std::make_shared<std::vector<Task>>();
  int64_t live = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (cnt[e] < 0 || live + cnt[e] > A) return Invalid("counts must be >= 0 and sum to <= A");
    for (int r = 0; r < cnt[e]; r += kRowsPerTask)
      tasks->push_back({static_cast<int>(e), static_cast<int>(live + r),
                        std::min(kRowsPerTask, cnt[e] - r)});
    live += cnt[e];
  }
  for (int64_t i = 0; i < A; ++i) {
    if (pdst[i] < 0 || pdst[i] >= A) return Invalid("dst index out of range [0, A)");
    if (i < live && (ptok[i] < 0 || ptok[i] >= T)) return Invalid("tok index out of range [0, T)");
  }
  float* py = y->typed_data();
  for (int64_t i = live; i < A; ++i) std::memset(py + static_cast<int64_t>(pdst[i]) * D, 0, sizeof(float) * D);
  const Problem prob{static_cast<int>(D), static_cast<int>(F), x.typed_data(), weight.typed_data(),
                     w_gate.typed_data(), w_up.typed_data(), w_down.typed_data(), ptok, pdst, py};

  // Workers claim tasks from a shared counter; the caller works too and returns once
  // every task is done. Workers that start late find nothing left and exit; the
  // shared state outlives this call for them.
  struct State {
    std::atomic<int> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  const int n_tasks = static_cast<int>(tasks->size());
  auto work = [state, tasks, prob, n_tasks]() {
    std::vector<float> scratch(static_cast<size_t>(kRowsPerTask) * (2 * prob.D + 2 * prob.F));
    for (int i; (i = state->next.fetch_add(1)) < n_tasks;) {
      RunTask((*tasks)[i], prob, scratch.data());
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n_tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work]() { work(); });
  work();
  while (state->done.load(std::memory_order_acquire) < n_tasks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jmoe_grouped_swiglu, GroupedSwiGLU,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::S32>>()   // tok
                                  .Arg<ffi::Buffer<ffi::S32>>()   // dst
                                  .Arg<ffi::Buffer<ffi::F32>>()   // weight
                                  .Arg<ffi::Buffer<ffi::S32>>()   // counts
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_gate
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_up
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_down
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y
