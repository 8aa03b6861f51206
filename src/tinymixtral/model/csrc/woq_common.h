// Shared by the kernels (woq_avx2.cpp: weight-only, fp32 activations; woq_q8.cpp: int8 activations; gemv_avx2.cpp:
// fp32 / bf16 weights): the threading over output rows, the operand checks, the activations' conversion to fp32,
// fp32 / bf16 loads, and the dispatch of a row count to the tile templates.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

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

// Row m of x times the weight of expert experts[m] (or the one weight): output rows [n0, n1) for up to 4
// rows of x at a time (each weight read once for them), or with experts one row at a time.
template <typename Rows>
at::Tensor run(const at::Tensor& x, int64_t N, int64_t row_bytes, const std::optional<at::Tensor>& experts,
               Rows rows) {
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* yp = y.mutable_data_ptr<float>();
  const int64_t blocks = (N + R - 1) / R;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (R * row_bytes));  // >= 64 KB of weights a task
  if (experts) {
    TORCH_CHECK(experts->dim() == 1 && experts->size(0) == M && experts->scalar_type() == at::kLong,
                "woq kernels: experts must be int64 [M]");
    const int64_t* e = experts->const_data_ptr<int64_t>();
    at::parallel_for(0, M * blocks, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m = b / blocks, n0 = (b % blocks) * R;
        rows(1, m, e[m], n0, std::min(N, n0 + R), yp + m * N);
      }
    });
  } else {
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t m = 0; m < M; m += 4) rows(std::min<int64_t>(4, M - m), m, 0, b0 * R, std::min(N, b1 * R), yp + m * N);
    });
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

inline void check(const at::Tensor& x, const at::Tensor& w, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) == K, "woq kernels: x must be [M, K] with unit stride");
  TORCH_CHECK(w.is_contiguous() && x.device().is_cpu(), "woq kernels: contiguous CPU weights");
}

}  // namespace woq
