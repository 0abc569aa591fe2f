// Shared pieces of jmoe's XLA:CPU kernels (cpu_kernels.cc): a vector type for
// AVX-512, AVX2 or plain loops, register-tiled matmuls, a vectorisable exp, work
// sharing over XLA's thread pool, kept scratch buffers.

#ifndef JMOE_CSRC_CPU_COMMON_H_
#define JMOE_CSRC_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jmoe_cpu {

// ---------------------------------------------------------------------------
// Vector registers: kW floats each. The plain build keeps kW-wide arrays and
// leaves vectorisation to the compiler.
#if defined(__AVX512F__)
constexpr int kW = 16, kMR = 8;  // 8 rows x 2 vectors = 16 zmm accumulators
using Vec = __m512;
inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec Splat(const float* p) { return _mm512_set1_ps(*p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kW = 8, kMR = 6;  // 6 rows x 2 vectors = 12 ymm accumulators
using Vec = __m256;
inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec Splat(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
#else
constexpr int kW = 8, kMR = 4;
struct Vec {
  float v[kW];
};
inline Vec Zero() { return Vec{}; }
inline Vec Load(const float* p) {
  Vec r;
  for (int j = 0; j < kW; ++j) r.v[j] = p[j];
  return r;
}
inline Vec Splat(const float* p) {
  Vec r;
  for (int j = 0; j < kW; ++j) r.v[j] = *p;
  return r;
}
inline Vec Fma(Vec a, Vec b, Vec c) {
  for (int j = 0; j < kW; ++j) c.v[j] += a.v[j] * b.v[j];
  return c;
}
inline void Store(float* p, Vec v) {
  for (int j = 0; j < kW; ++j) p[j] = v.v[j];
}
#endif
constexpr int kNR = 2 * kW;  // columns of one plain matmul tile

// bfloat16 as its 16 bits (XLA FFI's BF16 native type): widened exactly to float on
// load, rounded to nearest even on store.
using bf16 = uint16_t;
inline float ToF32(float x) { return x; }
inline float ToF32(bf16 b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void StoreAs(float* dst, float v) { *dst = v; }
inline void StoreAs(bf16* dst, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
    *dst = static_cast<bf16>((u >> 16) | 0x40);
    return;
  }
  *dst = static_cast<bf16>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline Vec LoadAs(const float* p) { return Load(p); }
inline Vec LoadAs(const bf16* p) {
#if defined(__AVX512F__)
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
#else
  Vec r;
  for (int j = 0; j < kW; ++j) r.v[j] = ToF32(p[j]);
  return r;
#endif
}

// exp(x) as 2^n * p(r) with |r| <= ln2/2 and a degree-6 polynomial (Cephes expf
// coefficients, ~1 ulp); plain arithmetic so the SiLU loops vectorise (std::exp
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

inline float SiluMul(float g, float u) { return g / (1.f + Exp(-g)) * u; }
// gelu_tanh(g) * u: 0.5 g (1 + tanh(z)) = g * sigmoid(2z), z = sqrt(2/pi) (g + 0.044715 g^3)
inline float GeluTanhMul(float g, float u) {
  const float z2 = 1.5957691216057308f * (g + 0.044715f * g * g * g);
  return g / (1.f + Exp(-z2)) * u;
}
inline float GateMul(bool gelu, float g, float u) {
  return gelu ? GeluTanhMul(g, u) : SiluMul(g, u);
}

// C[M x kNR] = A[M x K] * B[K x kNR]; row strides lda, ldb, ldc (in elements); B
// float or bfloat16, A and C float.
template <int M, typename TW>
inline void Tile(int K, const float* __restrict A, int lda, const TW* __restrict B, int ldb,
                 float* __restrict C, int ldc) {
  Vec c0[M], c1[M];
  for (int i = 0; i < M; ++i) c0[i] = c1[i] = Zero();
  for (int k = 0; k < K; ++k) {
    const TW* b = B + static_cast<int64_t>(k) * ldb;
    const Vec b0 = LoadAs(b), b1 = LoadAs(b + kW);
    for (int i = 0; i < M; ++i) {
      const Vec a = Splat(A + i * lda + k);
      c0[i] = Fma(a, b0, c0[i]);
      c1[i] = Fma(a, b1, c1[i]);
    }
  }
  for (int i = 0; i < M; ++i) {
    Store(C + i * ldc, c0[i]);
    Store(C + i * ldc + kW, c1[i]);
  }
}

// H[M x kW] = act(A * Bg) * (A * Bu), act SiLU or (gelu) tanh-GELU: gate and up share
// the A broadcasts, and the gated product is taken before anything is stored.
template <int M, typename TW>
inline void TileGateUp(int K, const float* __restrict A, int lda, const TW* __restrict Bg,
                       const TW* __restrict Bu, int ldb, float* __restrict H, int ldh,
                       bool gelu) {
  Vec g[M], u[M];
  for (int i = 0; i < M; ++i) g[i] = u[i] = Zero();
  for (int k = 0; k < K; ++k) {
    const Vec bg = LoadAs(Bg + static_cast<int64_t>(k) * ldb);
    const Vec bu = LoadAs(Bu + static_cast<int64_t>(k) * ldb);
    for (int i = 0; i < M; ++i) {
      const Vec a = Splat(A + i * lda + k);
      g[i] = Fma(a, bg, g[i]);
      u[i] = Fma(a, bu, u[i]);
    }
  }
  alignas(64) float gs[kW], us[kW];
  for (int i = 0; i < M; ++i) {
    Store(gs, g[i]);
    Store(us, u[i]);
    float* h = H + i * ldh;
    if (gelu) {
      for (int j = 0; j < kW; ++j) h[j] = GeluTanhMul(gs[j], us[j]);
    } else {
      for (int j = 0; j < kW; ++j) h[j] = SiluMul(gs[j], us[j]);
    }
  }
}

// Calls fn(std::integral_constant<int, m>) for the row count m in 1..kMR: tiles are
// unrolled per row count.
template <int M = kMR, typename Fn>
inline void ForRows(int m, Fn&& fn) {
  if constexpr (M > 0) {
    if (m == M) return fn(std::integral_constant<int, M>{});
    return ForRows<M - 1>(m, fn);
  }
}

// C[m x N] = A[m x K] * B[K x N], all row-major, B float or bfloat16; columns past the
// last full tile in scalar loops.
template <typename TW>
inline void Gemm(int m, int N, int K, const float* A, int lda, const TW* B, int ldb, float* C,
                 int ldc) {
  int n0 = 0;
  for (; n0 + kNR <= N; n0 += kNR)
    for (int i = 0; i < m; i += kMR)
      ForRows(std::min(kMR, m - i), [&](auto rows) {
        Tile<decltype(rows)::value>(K, A + static_cast<int64_t>(i) * lda, lda, B + n0, ldb,
                                    C + static_cast<int64_t>(i) * ldc + n0, ldc);
      });
  for (; n0 < N; ++n0)
    for (int i = 0; i < m; ++i) {
      float s = 0.f;
      for (int k = 0; k < K; ++k)
        s += A[static_cast<int64_t>(i) * lda + k] * ToF32(B[static_cast<int64_t>(k) * ldb + n0]);
      C[static_cast<int64_t>(i) * ldc + n0] = s;
    }
}

// H[m x F] = act(A * Bg) * (A * Bu), A [m x K], Bg and Bu [K x F] float or bfloat16; act
// SiLU, or tanh-GELU with ``gelu``.
template <typename TW>
inline void GateUp(int m, int F, int K, const float* A, int lda, const TW* Bg, const TW* Bu,
                   float* H, bool gelu = false) {
  int n0 = 0;
  for (; n0 + kW <= F; n0 += kW)
    for (int i = 0; i < m; i += kMR)
      ForRows(std::min(kMR, m - i), [&](auto rows) {
        TileGateUp<decltype(rows)::value>(K, A + static_cast<int64_t>(i) * lda, lda, Bg + n0,
                                          Bu + n0, F, H + static_cast<int64_t>(i) * F + n0, F,
                                          gelu);
      });
  for (; n0 < F; ++n0)
    for (int i = 0; i < m; ++i) {
      float g = 0.f, u = 0.f;
      for (int k = 0; k < K; ++k) {
        const float a = A[static_cast<int64_t>(i) * lda + k];
        g += a * ToF32(Bg[static_cast<int64_t>(k) * F + n0]);
        u += a * ToF32(Bu[static_cast<int64_t>(k) * F + n0]);
      }
      H[static_cast<int64_t>(i) * F + n0] = GateMul(gelu, g, u);
    }
}

// Runs fn(i, scratch) for i in [0, n) over the XLA thread pool and the calling thread.
// Workers claim indices from a shared counter; the caller works too and returns once
// all are done. A worker that starts late claims nothing and exits without touching
// the call's buffers; only the counters (shared state) outlive the call for it.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int n, size_t scratch_floats, Fn fn) {
  struct State {
    std::atomic<int> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, scratch_floats, fn]() {
    std::vector<float> scratch(scratch_floats);
    for (int i; (i = state->next.fetch_add(1)) < n;) {
      fn(i, scratch.data());
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work]() { work(); });
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Grow-only float buffers shared by all calls: a call leases one for its duration.
// Fresh allocations of tens of MB cost page faults on every call (measured: the
// cpu_gmm layer at 4096 tokens 1.2x slower); kept buffers do not. A process keeps
// as many as calls ran at once, each the size of the largest lease it served.
class ScratchLease {
 public:
  explicit ScratchLease(int64_t floats) {
    if (floats <= 0) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        buf_ = std::move(free_.back());
        free_.pop_back();
      }
    }
    if (!buf_) buf_ = std::make_unique<std::vector<float>>();
    if (buf_->size() < static_cast<size_t>(floats)) buf_->resize(floats);
  }
  ~ScratchLease() {
    if (!buf_) return;
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(buf_));
  }
  float* data() { return buf_ ? buf_->data() : nullptr; }

 private:
  std::unique_ptr<std::vector<float>> buf_;
  static inline std::mutex mu_;
  static inline std::vector<std::unique_ptr<std::vector<float>>> free_;
};

inline ffi::Error Invalid(const char* kernel, const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(kernel) + ": " + what);
}

}  // namespace jmoe_cpu

#endif  // JMOE_CSRC_CPU_COMMON_H_
