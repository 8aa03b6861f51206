// Shared by the kernels (woq_avx2.cpp: weight-only, fp32 activations; woq_q8.cpp: int8 activations; gemv_avx2.cpp:
// fp32 / bf16 weights): the threading over output rows, the operand checks, the activations' conversion to fp32,
// fp32 / bf16 loads, and the dispatch of a row count to the tile templates.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "team.h"

namespace woq {

constexpr int R = 8;  // output rows per parallel task unit; tiles below take NR <= R of them at a time

// acc + the sums of 4 adjacent products u8 x s8 (u unsigned, s signed bytes) in each int32 lane. One instruction
// where the CPU has VNNI (the build adds -mavx512vnni -mavx512vl or -mavxvnni there); else maddubs + madd, which is
// exact for our operands (|u| <= 127, or <= 15, times |s| <= 127: the int16 pair sums never saturate).
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// [Σa, Σb, Σc, Σd]: four horizontal sums at once (a tile's outputs; 5 instructions where one hsum takes 6).
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// y[r] = Σ v[r] + add[r] for NR vectors, four at a time where NR allows.
template <int NR>
inline void hsums(const __m256 (&v)[NR], const float* add, float* y) {
  int r = 0;
  for (; r + 4 <= NR; r += 4)
    _mm_storeu_ps(y + r, _mm_add_ps(hsum4(v[r], v[r + 1], v[r + 2], v[r + 3]), _mm_loadu_ps(add + r)));
  for (; r < NR; ++r) y[r] = hsum(v[r]) + add[r];
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// e^x for 8 floats, Cephes' expf: x = n ln 2 + r (ln 2 in two parts), e^r by a degree-7 polynomial, times 2^n
// through the exponent bits. Within 2 ulp of std::exp; x < -87.3 gives 0 (no subnormals), x > 88.4 +inf.
inline __m256 exp8(__m256 x) {
  const __m256 big = _mm256_set1_ps(88.3762626647949f), tiny = _mm256_set1_ps(-87.3365447504f);
  const __m256 over = _mm256_cmp_ps(x, big, _CMP_GT_OQ), under = _mm256_cmp_ps(x, tiny, _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, big), tiny);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), over);
  return _mm256_andnot_ps(under, y);
}

// y[j] = silu(g[j]) u[j], j < n: SwiGLU's gate times up
inline void swiglu(const float* g, const float* u, float* y, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 gv = _mm256_loadu_ps(g + j);
    const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_xor_ps(gv, sign))));
    _mm256_storeu_ps(y + j, _mm256_mul_ps(s, _mm256_loadu_ps(u + j)));
  }
  for (; j < n; ++j) y[j] = silu(g[j]) * u[j];
}

// fp32 or bf16 values as fp32 (bf16 -> fp32 is a 16-bit shift): weights, int4 scales and zeros read as stored.

inline float load1(const float* p) { return *p; }
inline float load1(const c10::BFloat16* p) { return static_cast<float>(*p); }
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// f(scales, zeros) with typed pointers: both fp32 or both bf16, contiguous, `n` elements each.
template <typename F>
auto with_scales(const at::Tensor& scales, const at::Tensor& zeros, int64_t n, F f) {
  TORCH_CHECK(scales.scalar_type() == zeros.scalar_type() && scales.is_contiguous() && zeros.is_contiguous() &&
                  scales.numel() == n && zeros.numel() == n,
              "woq kernels: scales and zeros [.., N, G], contiguous, of one dtype");
  if (scales.scalar_type() == at::kBFloat16)
    return f(scales.const_data_ptr<c10::BFloat16>(), zeros.const_data_ptr<c10::BFloat16>());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "woq kernels: int4 scales and zeros must be fp32 or bf16");
  return f(scales.const_data_ptr<float>(), zeros.const_data_ptr<float>());
}

// f(std::integral_constant<int, MB>) for MB = mb (1 to 4 rows of x): the tile templates are compiled per MB.
template <typename F>
void by_rows(int64_t mb, F f) {
  switch (mb) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

// x [M, K] (fp32, bf16 or fp16, unit column stride) -> fp32 [M, ld], split into even | odd columns for int4.
inline std::vector<float> to_float(const at::Tensor& x, bool split, int64_t ld) {
  const int64_t M = x.size(0), K = x.size(1), sx = x.stride(0);
  std::vector<float> out(M * ld);
  auto put = [&](auto* p) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k)
        out[m * ld + (split ? (k & 1) * (K / 2) + k / 2 : k)] = static_cast<float>(p[m * sx + k]);
  };
  switch (x.scalar_type()) {
    case at::kFloat: put(x.const_data_ptr<float>()); break;
    case at::kBFloat16: put(x.const_data_ptr<c10::BFloat16>()); break;
    case at::kHalf: put(x.const_data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "woq kernels: x must be fp32, bf16 or fp16, got ", x.scalar_type());
  }
  return out;
}

// x [M, K] as fp32 rows of stride K: x's own data where it is fp32 and contiguous (a decode step's activations),
// else a converted copy held in `copy`.
inline const float* float_rows(const at::Tensor& x, std::vector<float>& copy) {
  if (x.scalar_type() == at::kFloat && x.is_contiguous()) return x.const_data_ptr<float>();
  copy = to_float(x, false, x.size(1));
  return copy.data();
}

// The stable order of M rows (or assignments) by their expert e[m].
inline std::vector<int64_t> order_by_expert(const int64_t* e, int64_t M) {
  std::vector<int64_t> order(M);
  for (int64_t m = 0; m < M; ++m) order[m] = m;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return e[a] < e[b]; });
  return order;
}

// Runs of up to 4 consecutive rows of one expert, the rows taken in `order` (nullptr: 0, 1, ...): run c is
// rows order[first[c]] .. order[first[c + 1] - 1]; returns first, M at its end. A run's weight is read once.
inline std::vector<int64_t> runs_of_four(const int64_t* e, const int64_t* order, int64_t M) {
  std::vector<int64_t> first;
  auto row = [&](int64_t i) { return order ? order[i] : i; };
  for (int64_t i = 0; i < M; ++i)
    if (first.empty() || e[row(i)] != e[row(i - 1)] || i - first.back() == 4) first.push_back(i);
  first.push_back(M);
  return first;
}

// Row m of x times the weight of expert experts[m] (or the one weight): output rows [n0, n1) for up to 4
// rows of x at a time, each weight read once for them. With experts, the 4 rows are consecutive rows of one
// expert (by_expert puts the rows of an expert together).
template <typename Rows>
at::Tensor run(const at::Tensor& x, int64_t N, int64_t row_bytes, const std::optional<at::Tensor>& experts,
               Rows rows) {
  const int64_t M = x.size(0);
  at::Tensor y = scratch_tensor({M, N}, x.options().dtype(at::kFloat));
  float* yp = y.mutable_data_ptr<float>();
  const int64_t blocks = (N + R - 1) / R;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (R * row_bytes));  // >= 64 KB of weights a task
  if (experts) {
    TORCH_CHECK(experts->dim() == 1 && experts->size(0) == M && experts->scalar_type() == at::kLong,
                "woq kernels: experts must be int64 [M]");
    const int64_t* e = experts->const_data_ptr<int64_t>();
    const std::vector<int64_t> first = runs_of_four(e, nullptr, M);  // rows first[c] .. first[c + 1] - 1
    const int64_t runs = static_cast<int64_t>(first.size()) - 1;
    woq::parallel_for(0, runs * blocks, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c = b / blocks, m = first[c], n0 = (b % blocks) * R;
        rows(first[c + 1] - m, m, e[m], n0, std::min(N, n0 + R), yp + m * N);
      }
    });
  } else {
    woq::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t m = 0; m < M; m += 4) rows(std::min<int64_t>(4, M - m), m, 0, b0 * R, std::min(N, b1 * R), yp + m * N);
    });
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// The stable order of M rows by expert e[m], or an empty vector where every run of one expert is already
// together (a decode step's distinct experts; rows already grouped).
inline std::vector<int64_t> expert_order(const int64_t* e, int64_t M) {
  const std::vector<int64_t> order = order_by_expert(e, M);
  bool repeats_apart = false;  // an expert met again after another one
  for (int64_t i = 1; i < M && !repeats_apart; ++i)
    repeats_apart = e[order[i]] == e[order[i - 1]] && order[i] != order[i - 1] + 1;
  return repeats_apart ? order : std::vector<int64_t>{};
}

// Whether each expert's rows already lie together: no run of one expert starts after another of its runs. O(M^2),
// for a few rows.
inline bool grouped(const int64_t* e, int64_t M) {
  for (int64_t i = 1; i < M; ++i)
    if (e[i] != e[i - 1])
      for (int64_t j = 0; j + 1 < i; ++j)
        if (e[j] == e[i]) return false;
  return true;
}

// f(x, experts) -> y [M, N] with the rows of one expert next to each other, so that `run` reads each expert's
// weight once for up to 4 of its rows (a few tokens' prefill: ~4 rows an expert) instead of once a row. Checks
// the expert ids against the stack's E; y's rows come back in x's order.
template <typename F>
at::Tensor by_expert(const at::Tensor& x, const std::optional<at::Tensor>& experts, int64_t E, F f) {
  if (!experts) return f(x, experts);
  TORCH_CHECK(experts->dim() == 1 && experts->size(0) == x.size(0) && experts->scalar_type() == at::kLong,
              "woq kernels: experts must be int64 [M]");
  const at::Tensor ex = experts->contiguous();
  const int64_t* e = ex.const_data_ptr<int64_t>();
  const int64_t M = ex.size(0);
  for (int64_t m = 0; m < M; ++m) TORCH_CHECK(e[m] >= 0 && e[m] < E, "woq kernels: expert id out of range");
  if (M <= 64 && grouped(e, M)) return f(x, std::optional<at::Tensor>(ex));  // a decode step: no sort, no copy
  const std::vector<int64_t> order = expert_order(e, M);
  if (order.empty()) return f(x, std::optional<at::Tensor>(ex));
  at::Tensor perm = at::empty({M}, ex.options());
  std::copy(order.begin(), order.end(), perm.mutable_data_ptr<int64_t>());
  const at::Tensor ys = f(x.index_select(0, perm), std::optional<at::Tensor>(ex.index_select(0, perm)));
  return at::empty_like(ys).index_copy_(0, perm, ys);
}

inline void check(const at::Tensor& x, const at::Tensor& w, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) == K, "woq kernels: x must be [M, K] with unit stride");
  TORCH_CHECK(w.is_contiguous() && x.device().is_cpu(), "woq kernels: contiguous CPU weights");
}

}  // namespace woq
