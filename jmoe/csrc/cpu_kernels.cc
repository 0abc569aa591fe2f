// jmoe's XLA:CPU kernels, called as XLA FFI custom calls (jmoe/cpu_kernels.py builds
// this file on first use for the host CPU and registers them):
//   jmoe_grouped_swiglu  the MoE experts of moe_backend="cpu_gmm" (float32; the _bf16
//                        variant reads and writes bfloat16, computes in float);
//   jmoe_top_k           the router's top-k expert ids;
//   jmoe_attention       softmax attention over [B, L, H, K] queries (GQA, additive bias);
//   jmoe_rotary          NeoX-style rotary embedding of [B, L, H, K] (XLA would fuse the
//                        tables' cos and sin into each use and evaluate them per head).
//
// Why: on XLA:CPU the static-shape alternatives pad every expert to a common
// capacity and pay a fixed cost per batched dot (and sort and gather around them),
// XLA's TopK runs on one thread, and attention pays for head-major transposed
// copies of q, k and v and a pass per softmax step.
// Here each expert computes exactly its own rows, and both kernels share work over
// XLA's intra-op thread pool and the calling thread.
//
// Shape letters: T tokens, D model dim, F expert ffn dim, E experts, A assignments,
// K experts per token.


#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jmoe_cpu;  // NOLINT: the shared tiles and helpers

// Rows of one expert per task (measured on a 2-core AVX-512 CPU: 24 to 256 rows, and
// packing the weight panels, all within 5%; the tiles run at ~0.8 of its dense peak).
constexpr int kRowsPerTask = 48;
// ---------------------------------------------------------------------------
// jmoe_grouped_swiglu. Inputs, one row per assignment a (the Routing's flat list):
//   x       f32[T, D]   token rows
//   token   s32[A]      the token row assignment a reads
//   expert  s32[A]      its expert, E (or more) when dropped
//   weight  f32[A]      its combine weight
//   w_gate  f32[E, D, F], w_up f32[E, D, F], w_down f32[E, F, D]
// Attribute activation: the gate's, 0 SiLU (SwiGLU experts), 1 tanh-GELU (GeGLU).
// Attribute combine_k. Output:
//   combine_k == 0:  y f32[A, D], y[a] = weight[a] * SwiGLU_{expert[a]}(x[token[a]])
//                    (gate/up/SiLU/down with that expert's weights), zero when dropped;
//   combine_k == K:  y f32[T, D], y[t] = sum of those rows over a in [t*K, t*K + K)
//                    (token-major routings, A == T*K), so that memory traffic and time
//                    follow the live assignments, not T*K.
// Assignments are grouped by expert with a counting sort, so each expert multiplies
// exactly its own rows.

struct Task {
  int expert, row0, rows;  // rows [row0, row0 + rows) of the expert-sorted order
};

template <typename T>  // float or bf16: x, the expert weights and y
struct Problem {
  int D, F;
  const T *x, *w_gate, *w_up, *w_down;
  const float* weight;
  const int32_t* token;
  const int32_t* order;  // sorted position -> assignment
  T* y;                  // combine_k == 0: rows [A, D] by assignment
  float* rows;           // combine_k > 0: float rows [live, D] by sorted position
  bool gelu;             // gate activation: tanh-GELU (GeGLU experts) instead of SiLU
};

// One task: up to kRowsPerTask rows of one expert. Gather (widened to float),
// gate/up with SiLU, down, weighted write.
template <typename T>
void RunTask(const Task& t, const Problem<T>& p, float* scratch) {
  const int D = p.D, F = p.F, m = t.rows;
  float* xs = scratch;                  // [rows, D]
  float* h = xs + kRowsPerTask * D;     // [rows, F]
  float* out = h + kRowsPerTask * F;    // [rows, D]
  const int32_t* rows = p.order + t.row0;
  for (int i = 0; i < m; ++i) {
    const T* src = p.x + static_cast<int64_t>(p.token[rows[i]]) * D;
    float* dst = xs + static_cast<int64_t>(i) * D;
    for (int j = 0; j < D; ++j) dst[j] = ToF32(src[j]);
  }
  const int64_t e = t.expert;
  GateUp(m, F, D, xs, D, p.w_gate + e * D * F, p.w_up + e * D * F, h, p.gelu);
  Gemm(m, D, F, h, F, p.w_down + e * F * D, D, out, D);
  for (int i = 0; i < m; ++i) {
    const float w = p.weight[rows[i]];
    const float* src = out + static_cast<int64_t>(i) * D;
    if (p.rows) {
      float* y = p.rows + static_cast<int64_t>(t.row0 + i) * D;
      for (int j = 0; j < D; ++j) y[j] = w * src[j];
    } else {
      T* y = p.y + static_cast<int64_t>(rows[i]) * D;
      for (int j = 0; j < D; ++j) StoreAs(y + j, w * src[j]);
    }
  }
}

constexpr int kCombineRows = 64;  // tokens per combine task

template <ffi::DataType DT>
ffi::Error GroupedSwiGLU(ffi::ThreadPool pool, ffi::Buffer<DT> x, ffi::Buffer<ffi::S32> token,
                         ffi::Buffer<ffi::S32> expert, ffi::Buffer<ffi::F32> weight,
                         ffi::Buffer<DT> w_gate, ffi::Buffer<DT> w_up, ffi::Buffer<DT> w_down,
                         ffi::ResultBuffer<DT> y, int64_t combine_k, int64_t activation) {
  using T = ffi::NativeType<DT>;
  constexpr const char* kName = "jmoe_grouped_swiglu";
  const auto xd = x.dimensions(), gd = w_gate.dimensions(), ud = w_up.dimensions(),
             dd = w_down.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || gd.size() != 3 || ud.size() != 3 || dd.size() != 3 || yd.size() != 2)
    return Invalid(kName, "expected x [T, D], weights [E, D, F], [E, D, F], [E, F, D], 2-D y");
  const int64_t T_ = xd[0], D = xd[1], E = gd[0], F = gd[2], A = token.element_count();
  if (gd[1] != D || ud[0] != E || ud[1] != D || ud[2] != F || dd[0] != E || dd[1] != F ||
      dd[2] != D)
    return Invalid(kName, "expert weight shapes disagree with x [T, D] and w_gate [E, D, F]");
  if (static_cast<int64_t>(expert.element_count()) != A ||
      static_cast<int64_t>(weight.element_count()) != A)
    return Invalid(kName, "token, expert and weight must all be [A]");
  if (combine_k < 0 || (combine_k > 0 && A != T_ * combine_k))
    return Invalid(kName, "combine_k must be 0 or K with A == T*K");
  if (activation != 0 && activation != 1)
    return Invalid(kName, "activation must be 0 (SiLU) or 1 (tanh-GELU)");
  if (yd[0] != (combine_k ? T_ : A) || yd[1] != D)
    return Invalid(kName, "y must be [A, D] (combine_k == 0) or [T, D]");
  const int32_t *ptok = token.typed_data(), *pexp = expert.typed_data();
  T* py = y->typed_data();
  // counting sort by expert (stable)
  std::vector<int32_t> start(E + 1, 0);
  for (int64_t a = 0; a < A; ++a) {
    if (pexp[a] < 0) return Invalid(kName, "expert id below 0");
    if (pexp[a] >= E) continue;
    if (ptok[a] < 0 || ptok[a] >= T_) return Invalid(kName, "token index out of range [0, T)");
    ++start[pexp[a] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  const int64_t live = start[E];
  std::vector<int32_t> order(live);
  std::vector<int32_t> pos(combine_k ? A : 0);  // assignment -> sorted position
  {
    std::vector<int32_t> next(start.begin(), start.end() - 1);
    for (int64_t a = 0; a < A; ++a) {
      if (pexp[a] >= E) {
        if (!combine_k) std::memset(py + a * D, 0, sizeof(T) * D);  // +0.0 in both types
        continue;
      }
      const int32_t at = next[pexp[a]]++;
      order[at] = static_cast<int32_t>(a);
      if (combine_k) pos[a] = at;
    }
  }
  // combine_k: the live rows in float, sorted; kept between calls, not zero-initialised
  ScratchLease rows(combine_k ? live * D : 0);
  std::vector<Task> tasks;
  for (int64_t e = 0; e < E; ++e)
    for (int r = start[e]; r < start[e + 1]; r += kRowsPerTask)
      tasks.push_back({static_cast<int>(e), r, std::min(kRowsPerTask, start[e + 1] - r)});
  const Problem<T> prob{static_cast<int>(D), static_cast<int>(F), x.typed_data(),
                        w_gate.typed_data(), w_up.typed_data(), w_down.typed_data(),
                        weight.typed_data(), ptok, order.data(), py,
                        combine_k ? rows.data() : nullptr, activation == 1};
  const Task* ptasks = tasks.data();
  ParallelFor(pool, static_cast<int>(tasks.size()),
              static_cast<size_t>(kRowsPerTask) * (2 * D + F),
              [ptasks, prob](int i, float* scratch) { RunTask(ptasks[i], prob, scratch); });
  if (combine_k) {
    const float* ys = rows.data();
    const int32_t* ppos = pos.data();
    ParallelFor(pool, static_cast<int>((T_ + kCombineRows - 1) / kCombineRows),
                static_cast<size_t>(D), [=](int task, float* acc) {
                  const int64_t t1 = std::min<int64_t>(T_, (task + 1) * int64_t{kCombineRows});
                  for (int64_t t = task * int64_t{kCombineRows}; t < t1; ++t) {
                    std::fill(acc, acc + D, 0.f);
                    for (int64_t a = t * combine_k; a < (t + 1) * combine_k; ++a) {
                      if (pexp[a] >= E) continue;
                      const float* src = ys + static_cast<int64_t>(ppos[a]) * D;
                      for (int64_t j = 0; j < D; ++j) acc[j] += src[j];
                    }
                    for (int64_t j = 0; j < D; ++j) StoreAs(py + t * D + j, acc[j]);
                  }
                });
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// jmoe_top_k: x f32[T, E] -> ids s32[T, K], each row's K largest entries, largest
// first; equal values keep the lower index first (jax.lax.top_k's order). Floats
// compare in IEEE total order (-NaN < -inf < ... < inf < NaN).

inline int32_t TotalOrderKey(float v) {
  int32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b ^ ((b >> 31) & 0x7fffffff);
}

constexpr int kTopKRowsPerTask = 64;

ffi::Error TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> ids) {
  constexpr const char* kName = "jmoe_top_k";
  const auto xd = x.dimensions(), od = ids->dimensions();
  if (xd.size() != 2 || od.size() != 2 || od[0] != xd[0] || od[1] < 1 || od[1] > xd[1])
    return Invalid(kName, "expected x [T, E] and ids [T, K] with 1 <= K <= E");
  const int64_t T = xd[0], E = xd[1], K = od[1];
  const float* px = x.typed_data();
  int32_t* pid = ids->typed_data();
  const int n_tasks = static_cast<int>((T + kTopKRowsPerTask - 1) / kTopKRowsPerTask);
  ParallelFor(pool, n_tasks, static_cast<size_t>(K), [=](int task, float* scratch) {
    int32_t* keys = reinterpret_cast<int32_t*>(scratch);  // [K], sorted descending
    const int64_t t1 = std::min<int64_t>(T, (task + 1) * int64_t{kTopKRowsPerTask});
    for (int64_t t = task * int64_t{kTopKRowsPerTask}; t < t1; ++t) {
      const float* row = px + t * E;
      int32_t* out = pid + t * K;
      int n = 0;
      for (int64_t e = 0; e < E; ++e) {
        const int32_t key = TotalOrderKey(row[e]);
        if (n == K && key <= keys[K - 1]) continue;  // not above the K-th: ties keep earlier
        int j = n < K ? n++ : K - 1;
        for (; j > 0 && key > keys[j - 1]; --j) {
          keys[j] = keys[j - 1];
          out[j] = out[j - 1];
        }
        keys[j] = key;
        out[j] = static_cast<int32_t>(e);
      }
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// jmoe_attention: out[b, i, h] = sum_j softmax_j(q[b, i, h] . k[b, j, n] * scale
//                                                + bias[b, 0, i, j]) v[b, j, n]
// with n = h / (H / N) (grouped-query heads), in the projections' own layouts:
//   q f32[B, L, H, K], k and v f32[B, S, N, K], bias f32[B or 1, 1, L or 1, S]
//   (additive: 0 or a large negative number), out f32[B, L, H, K].
// Attribute causal (L == S and the bias hides every key j > i): a query block skips
// the keys past its last row; their exp underflows to exactly 0 anyway. A row whose
// keys are all masked averages the keys it visited (its output is never used).

constexpr int kQueryRows = 32;  // query rows per task

struct AttnProblem {
  int64_t B, L, S, S_pad, H, N, K, bias_b, bias_l;
  float scale;
  bool causal;
  const float *q, *v, *bias;
  const float* kt;  // k transposed: [B, N, K, S_pad], zero past S
  float* out;
};

void AttnTask(int task, const AttnProblem& p, float* scratch) {
  const int64_t blocks = (p.L + kQueryRows - 1) / kQueryRows;
  const int64_t b = task / (p.H * blocks), h = task / blocks % p.H, i0 = task % blocks * kQueryRows;
  const int64_t n = h / (p.H / p.N), K = p.K, S = p.S;
  const int m = static_cast<int>(std::min<int64_t>(kQueryRows, p.L - i0));
  const int64_t keys = p.causal ? std::min<int64_t>(S, i0 + m) : S;
  const int64_t ld = (keys + kNR - 1) / kNR * kNR;  // score row stride, padded to whole tiles
  float* qs = scratch;                  // [m, K], scaled
  float* sc = qs + kQueryRows * K;      // [m, ld] scores, then probabilities
  float* os = sc + kQueryRows * ld;     // [m, K]
  for (int i = 0; i < m; ++i) {
    const float* src = p.q + ((b * p.L + i0 + i) * p.H + h) * K;
    for (int64_t c = 0; c < K; ++c) qs[i * K + c] = src[c] * p.scale;
  }
  // scores: [m, K] x kt[b, n] ([K, S_pad] row-major) in whole tiles of kNR keys
  // (ld <= S_pad; the columns past `keys` are never used)
  const float* kt = p.kt + (b * p.N + n) * K * p.S_pad;
  Gemm(m, static_cast<int>(ld), static_cast<int>(K), qs, static_cast<int>(K), kt,
       static_cast<int>(p.S_pad), sc, static_cast<int>(ld));
  for (int i = 0; i < m; ++i) {
    float* row = sc + i * ld;
    const float* bias = p.bias + ((p.bias_b == 1 ? 0 : b) * p.bias_l +
                                  (p.bias_l == 1 ? 0 : i0 + i)) * S;
    float mx = -INFINITY;
    for (int64_t j = 0; j < keys; ++j) {
      row[j] += bias[j];
      mx = std::max(mx, row[j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < keys; ++j) {
      row[j] = Exp(row[j] - mx);
      sum += row[j];
    }
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < keys; ++j) row[j] *= inv;
  }
  // out rows: probabilities [m, keys] x v[b, :keys, n] (row stride N*K)
  Gemm(m, static_cast<int>(K), static_cast<int>(keys), sc, static_cast<int>(ld),
       p.v + (b * S * p.N + n) * K, static_cast<int>(p.N * K), os, static_cast<int>(K));
  for (int i = 0; i < m; ++i)
    std::memcpy(p.out + ((b * p.L + i0 + i) * p.H + h) * K, os + i * K, sizeof(float) * K);
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias,
                     ffi::ResultBuffer<ffi::F32> out, bool causal) {
  constexpr const char* kName = "jmoe_attention";
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
             bd = bias.dimensions(), od = out->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || bd.size() != 4 || od.size() != 4)
    return Invalid(kName, "expected q [B, L, H, K], k and v [B, S, N, K], bias [B, 1, L, S]");
  const int64_t B = qd[0], L = qd[1], H = qd[2], K = qd[3], S = kd[1], N = kd[2];
  if (kd[0] != B || kd[3] != K || N < 1 || H % N != 0 || vd[0] != B || vd[1] != S ||
      vd[2] != N || vd[3] != K)
    return Invalid(kName, "k and v must be [B, S, N, K] with N dividing q's H");
  if ((bd[0] != 1 && bd[0] != B) || bd[1] != 1 || (bd[2] != 1 && bd[2] != L) || bd[3] != S)
    return Invalid(kName, "bias must be [B or 1, 1, L or 1, S]");
  if (od[0] != B || od[1] != L || od[2] != H || od[3] != K)
    return Invalid(kName, "out must have q's shape");
  if (causal && L != S) return Invalid(kName, "causal needs L == S");
  if (B * L * H == 0) return ffi::Error::Success();
  if (S == 0) return Invalid(kName, "no keys (S == 0)");
  // k transposed per (batch, kv head) into [K, S_pad] rows, S_pad a whole number of
  // tiles so score tiles never read past a row
  const int64_t s_pad = (S + kNR - 1) / kNR * kNR;
  ScratchLease lease(B * N * K * s_pad);
  float* kt = lease.data();
  const float* pk = k.typed_data();
  ParallelFor(pool, static_cast<int>(B * N), 0, [=](int bn, float*) {
    const int64_t b = bn / N, n = bn % N;
    float* dst = kt + bn * K * s_pad;
    for (int64_t j = 0; j < S; ++j) {
      const float* src = pk + ((b * S + j) * N + n) * K;
      for (int64_t c = 0; c < K; ++c) dst[c * s_pad + j] = src[c];
    }
    for (int64_t c = 0; c < K; ++c) std::fill(dst + c * s_pad + S, dst + (c + 1) * s_pad, 0.f);
  });
  const AttnProblem prob{B, L, S, s_pad, H, N, K, bd[0], bd[2],
                         1.f / std::sqrt(static_cast<float>(K)), causal, q.typed_data(),
                         v.typed_data(), bias.typed_data(), kt, out->typed_data()};
  const int64_t blocks = (L + kQueryRows - 1) / kQueryRows;
  ParallelFor(pool, static_cast<int>(B * H * blocks),
              static_cast<size_t>(kQueryRows) * (2 * K + s_pad),
              [prob](int task, float* scratch) { AttnTask(task, prob, scratch); });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// jmoe_rotary: x f32[B, L, H, K], cos and sin f32[B, L, R] (NeoX layout: the R/2
// frequencies twice), R <= K even -> out[..., :R] = x[..., :R] * cos + rotate(x) * sin
// with rotate(x) = [-x[R/2:R], x[:R/2]]; out[..., R:] = x[..., R:].

ffi::Error Rotary(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> cos,
                  ffi::Buffer<ffi::F32> sin, ffi::ResultBuffer<ffi::F32> out) {
  constexpr const char* kName = "jmoe_rotary";
  const auto xd = x.dimensions(), cd = cos.dimensions(), sd = sin.dimensions();
  if (xd.size() != 4 || cd.size() != 3 || sd.size() != 3)
    return Invalid(kName, "expected x [B, L, H, K] and cos, sin [B, L, R]");
  const int64_t B = xd[0], L = xd[1], H = xd[2], K = xd[3], R = cd[2];
  if (cd[0] != B || cd[1] != L || sd[0] != B || sd[1] != L || sd[2] != R || R % 2 || R > K)
    return Invalid(kName, "cos and sin must be [B, L, R] with R even and R <= K");
  const float *px = x.typed_data(), *pc = cos.typed_data(), *ps = sin.typed_data();
  float* po = out->typed_data();
  const int64_t rows = B * L, half = R / 2;
  ParallelFor(pool, static_cast<int>((rows + 63) / 64), 0, [=](int task, float*) {
    for (int64_t r = task * int64_t{64}; r < std::min(rows, (task + 1) * int64_t{64}); ++r) {
      const float *c = pc + r * R, *s = ps + r * R;
      for (int64_t h = 0; h < H; ++h) {
        const float* xi = px + (r * H + h) * K;
        float* o = po + (r * H + h) * K;
        for (int64_t j = 0; j < half; ++j) o[j] = xi[j] * c[j] - xi[j + half] * s[j];
        for (int64_t j = half; j < R; ++j) o[j] = xi[j] * c[j] + xi[j - half] * s[j];
        for (int64_t j = R; j < K; ++j) o[j] = xi[j];
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

#define JMOE_GROUPED_SWIGLU_BINDING(DT)                                      \
  ffi::Ffi::Bind()                                                           \
      .Ctx<ffi::ThreadPool>()                                                \
      .Arg<ffi::Buffer<DT>>()         /* x */                                \
      .Arg<ffi::Buffer<ffi::S32>>()   /* token */                            \
      .Arg<ffi::Buffer<ffi::S32>>()   /* expert */                           \
      .Arg<ffi::Buffer<ffi::F32>>()   /* weight */                           \
      .Arg<ffi::Buffer<DT>>()         /* w_gate */                           \
      .Arg<ffi::Buffer<DT>>()         /* w_up */                             \
      .Arg<ffi::Buffer<DT>>()         /* w_down */                           \
      .Ret<ffi::Buffer<DT>>()         /* y */                                \
      .Attr<int64_t>("combine_k")                                            \
      .Attr<int64_t>("activation") /* 0 SiLU, 1 tanh-GELU */

XLA_FFI_DEFINE_HANDLER_SYMBOL(jmoe_grouped_swiglu, GroupedSwiGLU<ffi::F32>,
                              JMOE_GROUPED_SWIGLU_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jmoe_grouped_swiglu_bf16, GroupedSwiGLU<ffi::BF16>,
                              JMOE_GROUPED_SWIGLU_BINDING(ffi::BF16));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jmoe_attention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Attr<bool>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jmoe_rotary, Rotary,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()    // sin
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(jmoe_top_k, TopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x
                                  .Ret<ffi::Buffer<ffi::S32>>());  // ids
