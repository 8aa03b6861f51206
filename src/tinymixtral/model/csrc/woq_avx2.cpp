// Weight-only int8 / int4 products for a few rows (decode) on AVX2 + FMA: y [M, N] = x [M, K] @ W^T,
// W dequantized in registers and the products summed in fp32 (the activations are not quantized).
//
// int8: weight int8 [N, K], scales fp32 [N] (w = q * s; s is applied once per output).
// int4: weight uint8 [N, K/2] in tinymixtral's storage layout (column 2j in the low nibble of byte j,
//       2j+1 in the high one), scales and zeros fp32 or bf16 [N, G] (w = (q - 8) s + z = q s + (z - 8 s)).
//       x is split once per call into its even and odd columns, so one byte-to-int32 widening of 8
//       bytes gives 16 weights: low nibbles (& 15) against x_even, high nibbles (>> 4) against x_odd.
// With `experts` [M] the weights are stacks [E, ...] and row m of x is multiplied by expert experts[m].
// Threads: torch's own pool, or the fused step's team (woq::parallel_for, team.h), over blocks of output rows.
#include <torch/library.h>

#include "ops.h"
#include "woq_common.h"

namespace {

using namespace woq;

// ---- int8 ------------------------------------------------------------------------------------------
// `rows` (<= R) weight rows w (stride K) times MB rows of x (stride ldx) -> y[m * ldy + r], scaled by s[r].
template <int MB, int NR>
void int8_tile(const float* x, int64_t ldx, const int8_t* w, int64_t K, const float* s, float* y, int64_t ldy) {
  __m256 acc[MB][NR];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r)
      wv[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + r * K + k))));
    for (int m = 0; m < MB; ++m) {
      __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) {
      float t = hsum(acc[m][r]);
      for (int64_t kk = k; kk < K; ++kk) t += float(w[r * K + kk]) * x[m * ldx + kk];
      y[m * ldy + r] = t * s[r];
    }
}

// Register tiles: MB x NR accumulators (8 independent FMA chains for one row of x: FMA latency).
template <int MB>
void int8_rows(const float* x, int64_t ldx, const int8_t* w, int64_t K, const float* s, int64_t n0, int64_t n1,
               float* y, int64_t ldy) {
  constexpr int NR = MB == 1 ? 8 : MB == 2 ? 4 : 2;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) int8_tile<MB, NR>(x, ldx, w + n * K, K, s + n, y + n, ldy);
  for (; n < n1; ++n) int8_tile<MB, 1>(x, ldx, w + n * K, K, s + n, y + n, ldy);
}

// ---- int4 ------------------------------------------------------------------------------------------
// x is split: xs[m * ldx + j] = x[m, 2j], xs[m * ldx + K/2 + j] = x[m, 2j + 1].
template <int MB, int NR, typename S>
void int4_tile(const float* xs, int64_t ldx, const uint8_t* w, int64_t K, const S* s, const S* z,
               int64_t G, int64_t gs, float* y, int64_t ldy) {
  const int64_t half = K / 2, gb = gs / 2;  // bytes per row, per group
  const __m256i low = _mm256_set1_epi32(15);
  const __m256 eight = _mm256_set1_ps(8.f);
  constexpr int A = MB == 1 ? 2 : 1;  // one row of x: low and high nibbles in separate accumulators (latency)
  __m256 acc[MB][NR][A];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r)
      for (int a = 0; a < A; ++a) acc[m][r][a] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 sv[NR], zv[NR];
    for (int r = 0; r < NR; ++r) {
      sv[r] = _mm256_set1_ps(load1(s + r * G + g));
      zv[r] = _mm256_fnmadd_ps(eight, sv[r], _mm256_set1_ps(load1(z + r * G + g)));  // z - 8 s
    }
    for (int64_t j = g * gb; j < (g + 1) * gb; j += 8) {
      __m256 lo[NR], hi[NR];
      for (int r = 0; r < NR; ++r) {
        __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(w + r * half + j)));
        lo[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(d, low)), sv[r], zv[r]);
        hi[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(d, 4)), sv[r], zv[r]);
      }
      for (int m = 0; m < MB; ++m) {
        __m256 xe = _mm256_loadu_ps(xs + m * ldx + j), xo = _mm256_loadu_ps(xs + m * ldx + half + j);
        for (int r = 0; r < NR; ++r) {
          acc[m][r][0] = _mm256_fmadd_ps(lo[r], xe, acc[m][r][0]);
          acc[m][r][A - 1] = _mm256_fmadd_ps(hi[r], xo, acc[m][r][A - 1]);
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) y[m * ldy + r] = hsum(A == 2 ? _mm256_add_ps(acc[m][r][0], acc[m][r][A - 1]) : acc[m][r][0]);
}

template <int MB, typename S>
void int4_rows(const float* xs, int64_t ldx, const uint8_t* w, int64_t K, const S* s, const S* z, int64_t G,
               int64_t gs, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  constexpr int NR = MB <= 2 ? 4 : 2;
  int64_t n = n0;
  const int64_t half = K / 2;
  for (; n + NR <= n1; n += NR) int4_tile<MB, NR>(xs, ldx, w + n * half, K, s + n * G, z + n * G, G, gs, y + n, ldy);
  for (; n < n1; ++n) int4_tile<MB, 1>(xs, ldx, w + n * half, K, s + n * G, z + n * G, G, gs, y + n, ldy);
}

at::Tensor int8_mm_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                        const std::optional<at::Tensor>& experts) {
  const int64_t N = w.size(-2), K = w.size(-1);
  check(x, w, K);
  TORCH_CHECK(w.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.numel() == w.numel() / K,
              "woq kernels: int8 weight [.., N, K] and fp32 scales [.., N]");
  TORCH_CHECK(experts.has_value() == (w.dim() == 3), "woq kernels: a stack of weights needs experts");
  std::vector<float> copy;
  const float* xp = float_rows(x, copy);
  const int8_t* wp = w.const_data_ptr<int8_t>();
  const float* sp = scales.const_data_ptr<float>();
  return run(x, N, K, experts, [&](int64_t mb, int64_t m, int64_t e, int64_t n0, int64_t n1, float* y) {
    const float *xm = xp + m * K, *se = sp + e * N;
    const int8_t* we = wp + e * N * K;
    by_rows(mb, [&](auto MB) { int8_rows<decltype(MB)::value>(xm, K, we, K, se, n0, n1, y, N); });
  });
}

at::Tensor int4_mm_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                        int64_t group_size, const std::optional<at::Tensor>& experts) {
  const int64_t N = w.size(-2), K = 2 * w.size(-1), G = scales.size(-1);
  check(x, w, K);
  TORCH_CHECK(w.scalar_type() == at::kByte && group_size % 16 == 0 && G * group_size == K,
              "woq kernels: int4 weight [.., N, K/2], groups a multiple of 16 that divide K");
  TORCH_CHECK(experts.has_value() == (w.dim() == 3), "woq kernels: a stack of weights needs experts");
  const std::vector<float> xf = to_float(x, true, K);
  const float* xp = xf.data();
  const uint8_t* wp = w.const_data_ptr<uint8_t>();
  const int64_t half = K / 2;
  return with_scales(scales, zeros, w.numel() / half * G, [&](const auto* sp, const auto* zp) {
    return run(x, N, half, experts, [&](int64_t mb, int64_t m, int64_t e, int64_t n0, int64_t n1, float* y) {
      const auto *se = sp + e * N * G, *ze = zp + e * N * G;
      const float* xm = xp + m * K;
      const uint8_t* we = wp + e * N * half;
      by_rows(mb, [&](auto MB) { int4_rows<decltype(MB)::value>(xm, K, we, K, se, ze, G, group_size, n0, n1, y, N); });
    });
  });
}

}  // namespace

namespace tmx {  // ops.h: the registered ops, also called as plain C++ functions (decode_step.cpp)

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                   const std::optional<at::Tensor>& experts) {
  const int64_t E = w.dim() == 3 ? w.size(0) : 1;
  return by_expert(x, experts, E, [&](const at::Tensor& xs, const std::optional<at::Tensor>& es) {
    return int8_mm_rows(xs, w, scales, es);
  });
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                   int64_t group_size, const std::optional<at::Tensor>& experts) {
  const int64_t E = w.dim() == 3 ? w.size(0) : 1;
  return by_expert(x, experts, E, [&](const at::Tensor& xs, const std::optional<at::Tensor>& es) {
    return int4_mm_rows(xs, w, scales, zeros, group_size, es);
  });
}

}  // namespace tmx

namespace {

// dequant(weight, scales, zeros, group_size, bf16) -> [.., N, K] fp32 or bf16: the weights themselves (int8:
// q s; int4, zeros given: (q - 8) s + z), for a long prefill's one matmul. Row by row on all threads.
template <typename O>
inline void put(float v, O* p) { *p = O(v); }

template <typename O>
at::Tensor dequant_as(const at::Tensor& w, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                      int64_t gs, at::Tensor& out) {
  const bool int4 = zeros.has_value();
  const int64_t K = out.size(-1), rows = out.numel() / std::max<int64_t>(1, K);
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, K));  // ~64 K weights a task
  O* op = out.mutable_data_ptr<O>();
  if (!int4) {
    TORCH_CHECK(w.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                    scales.numel() == rows,
                "dequant: int8 weight [.., N, K] and fp32 scales [.., N]");
    const int8_t* wp = w.const_data_ptr<int8_t>();
    const float* sp = scales.const_data_ptr<float>();
    woq::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t k = 0; k < K; ++k) put(float(wp[r * K + k]) * sp[r], op + r * K + k);
    });
    return out;
  }
  TORCH_CHECK(w.scalar_type() == at::kByte && gs > 0 && gs % 16 == 0 && K % gs == 0,
              "dequant: int4 weight [.., N, K/2], groups of a multiple of 16 that divide K");
  const int64_t G = K / gs;
  const uint8_t* wp = w.const_data_ptr<uint8_t>();
  with_scales(scales, *zeros, rows * G, [&](const auto* sp, const auto* zp) {
    woq::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      std::vector<float> row(K);
      const __m128i low = _mm_set1_epi8(15);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t g = 0; g < G; ++g) {
          const float sc = load1(sp + r * G + g);
          const __m256 s8 = _mm256_set1_ps(sc), z8 = _mm256_set1_ps(load1(zp + r * G + g) - 8.f * sc);
          for (int64_t j = g * gs; j < (g + 1) * gs; j += 32) {  // 16 bytes: columns j .. j + 31, low nibble first
            const int64_t left = (g + 1) * gs - j;  // 16 (8 bytes) at the end of a group of 16 * odd
            const __m128i* src = (const __m128i*)(wp + (r * K + j) / 2);
            const __m128i b = left >= 32 ? _mm_loadu_si128(src) : _mm_loadl_epi64(src);
            const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
            const __m128i a = _mm_unpacklo_epi8(lo, hi), c = _mm_unpackhi_epi8(lo, hi);
            const __m128i parts[4] = {a, _mm_srli_si128(a, 8), c, _mm_srli_si128(c, 8)};
            for (int i = 0; i < 4 && 8 * i < left; ++i) {
              const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
              _mm256_storeu_ps(&row[j + 8 * i], _mm256_fmadd_ps(q, s8, z8));
            }
          }
        }
        for (int64_t k = 0; k < K; ++k) put(row[k], op + r * K + k);
      }
    });
    return 0;
  });
  return out;
}

at::Tensor dequant(const at::Tensor& w, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                   int64_t group_size, bool bf16) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() >= 2, "dequant: a contiguous CPU weight [.., N, K]");
  std::vector<int64_t> shape(w.sizes().begin(), w.sizes().end());
  if (zeros) shape.back() *= 2;
  at::Tensor out = at::empty(shape, w.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  return bf16 ? dequant_as<c10::BFloat16>(w, scales, zeros, group_size, out)
              : dequant_as<float>(w, scales, zeros, group_size, out);
}

}  // namespace

TORCH_LIBRARY(tinymixtral_avx2, m) {
  m.def("int8_mm(Tensor x, Tensor weight, Tensor scales, Tensor? experts) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor weight, Tensor scales, Tensor zeros, int group_size, Tensor? experts) -> Tensor");
  m.def("dequant(Tensor weight, Tensor scales, Tensor? zeros, int group_size, bool bf16) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinymixtral_avx2, CPU, m) {
  m.impl("int8_mm", &tmx::int8_mm);
  m.impl("int4_mm", &tmx::int4_mm);
  m.impl("dequant", &dequant);
}
