// Weight-only int8 / int4 products for a few rows (decode) with the activations quantized to int8, the
// technique of llama.cpp's Q8_0 x Q8_0 and Q4_0 x Q8_0 dot products, on AVX2: y [M, N] = x [M, K] @ W^T.
//
// Activations: each row of x is quantized once per call, in blocks of 32 columns: d = max|x| / 127,
// q = round-half-even(x * (1 / d)) in [-127, 127] (d = 0: q = 0). All output rows, and all experts of the
// call, share them. 32 int8 products are summed exactly in int32 (woq::dpbusd: one VNNI instruction, or
// maddubs + madd on plain AVX2), converted to fp32 once per block and scaled by d, the blocks summed in
// fp32. So y = x_hat @ W_hat^T with x_hat = q * d: the weights' own dequantized values, times activations
// rounded to 8 bits per block (what llama.cpp computes; the fp32-activation kernels are in woq_avx2.cpp).
//
// int8: weight [N, K] in [-127, 127], scales fp32 [N], K % 32 == 0. dpbusd multiplies unsigned by signed
//   bytes: |w| against x's q carrying w's sign (_mm256_sign_epi8, llama.cpp's trick). The row scale goes on
//   once, at the end.
// int4: weight uint8 [N, K/2] in the storage layout (column 2j in the low nibble of byte j, 2j+1 in the high
//   one), scales and zeros fp32 or bf16 [N, G], group_size % 32 == 0. w = q s + (z - 8 s) with q in 0..15, already
//   unsigned. One 32-byte load holds 64 columns: its low nibbles are their even columns, its high nibbles the
//   odd ones. So x's q is kept per 64 columns as [even 32 | odd 32]: the low 128 bits then hold block 2p and
//   the high ones block 2p+1, and each gets its own d (and group scale) in a [d x4 | d' x4] vector. The
//   (z - 8 s) term needs only the sum of x_hat over each group, computed once per call.
// With `experts` [M] the weights are stacks [E, ...] and row m of x is multiplied by expert experts[m].
#include <torch/library.h>

#include <cstring>

#include "ops.h"
#include "woq_common.h"

namespace {

using namespace woq;

// ---- the activations -------------------------------------------------------------------------------
// 32 floats -> 32 int8 at q, their scale d and d * Σ q.
inline void quant_block(const float* x, int8_t* q, float* d, float* dsum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4], mx = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float amax = _mm_cvtss_f32(h), dd = amax / 127.f, id = dd != 0.f ? 1.f / dd : 0.f;
  __m256i i32[4];
  for (int i = 0; i < 4; ++i)
    i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(id)),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  // packs work per 128-bit lane: the dwords come out as x[0:4] x[8:12] x[16:20] x[24:28] | x[4:8] ...
  __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
  b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256((__m256i*)q, b);
  const __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  *d = dd;
  *dsum = dd * float(_mm_cvtsi128_si32(s));
}

// This thread's scratch of n T's, reused from call to call (a call's activations live until it returns, and no
// kernel runs inside another on one thread): no allocation a call.
template <typename T, int Slot>
T* scratch(int64_t n) {
  static thread_local std::vector<T> buf;
  if (int64_t(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// One call's activations: q [M, Kp] (Kp = K padded with zeros to `pad`), d and d * Σ q [M, nb] per block.
struct Q8 {
  int64_t Kp, nb;
  int8_t* q;
  float *d, *dsum;

  Q8(const at::Tensor& x, int64_t pad) {
    const int64_t M = x.size(0), K = x.size(1);
    Kp = (K + pad - 1) / pad * pad;
    nb = Kp / 32;
    q = scratch<int8_t, 0>(M * Kp);
    d = scratch<float, 1>(2 * M * nb);
    dsum = d + M * nb;
    std::vector<float> copy;
    const float* xf = float_rows(x, copy);
    for (int64_t m = 0; m < M; ++m) {
      const float* row = xf + m * K;
      int8_t* qm = q + m * Kp;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t c = b * 32;
        if (K - c >= 32) {
          quant_block(row + c, qm + c, &d[m * nb + b], &dsum[m * nb + b]);
        } else {  // the last columns, and blocks of padding: zeros past K
          float tail[32] = {0};
          std::copy(row + std::min(c, K), row + K, tail);
          quant_block(tail, qm + c, &d[m * nb + b], &dsum[m * nb + b]);
        }
      }
    }
  }
};

// ---- int8 ------------------------------------------------------------------------------------------
// NR weight rows w (stride K) times MB rows of quantized x -> y[m * ldy + r], scaled by s[r].
template <int MB, int NR>
void i8_tile(const Q8& a, int64_t m0, const int8_t* w, int64_t K, const float* s, float* y, int64_t ldy) {
  __m256 acc[MB][NR];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  const int8_t* xq = a.q + m0 * a.Kp;
  const float* xd = a.d + m0 * a.nb;
  for (int64_t b = 0; b < K / 32; ++b) {
    for (int r = 0; r < NR; ++r) {
      if (b % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (NR + r) * K + b * 32), _MM_HINT_T0);
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + r * K + b * 32));
      const __m256i aw = _mm256_sign_epi8(wv, wv);
      for (int m = 0; m < MB; ++m) {  // x's loads and broadcasts: from L1, left to the compiler to keep or not
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + m * a.Kp + b * 32));
        const __m256i p = dpbusd(_mm256_setzero_si256(), aw, _mm256_sign_epi8(xv, wv));
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(xd + m * a.nb + b), acc[m][r]);
      }
    }
  }
  const float zero[NR] = {};
  for (int m = 0; m < MB; ++m) {
    float t[NR];
    hsums<NR>(acc[m], zero, t);
    for (int r = 0; r < NR; ++r) y[m * ldy + r] = t[r] * s[r];
  }
}

template <int MB>
void i8_rows(const Q8& a, int64_t m0, const int8_t* w, int64_t K, const float* s, int64_t n0, int64_t n1, float* y,
             int64_t ldy) {
  constexpr int NR = MB == 1 ? 8 : MB == 2 ? 4 : 2;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) i8_tile<MB, NR>(a, m0, w + n * K, K, s + n, y + n, ldy);
  for (; n < n1; ++n) i8_tile<MB, 1>(a, m0, w + n * K, K, s + n, y + n, ldy);
}

// ---- int4 ------------------------------------------------------------------------------------------
// The int4 operands of x: q per 64 columns as [even 32 | odd 32], [d x4 | d' x4] per 64 columns, and
// xg [M, G]: the sum of x_hat over each group.
struct Q4Act {
  Q8 a;
  float *dd, *xg;
  int64_t np, G;

  Q4Act(const at::Tensor& x, int64_t group_size) : a(x, 64) {
    const int64_t M = x.size(0), K = x.size(1);
    np = a.Kp / 64;
    G = K / group_size;
    dd = scratch<float, 2>(M * np * 8 + M * G);
    xg = dd + M * np * 8;
    std::fill(xg, xg + M * G, 0.f);
    // 64 bytes -> [the even ones | the odd ones]: bytes to evens then odds within each 128-bit lane, then the 64-bit
    // quarters of the two halves' lanes put in order
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t p = 0; p < np; ++p) {
        int8_t* q = a.q + m * a.Kp + p * 64;
        const __m256i lo = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)q), split);
        const __m256i hi = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)(q + 32)), split);
        _mm256_storeu_si256((__m256i*)q, _mm256_permute4x64_epi64(_mm256_unpacklo_epi64(lo, hi), 0xd8));
        _mm256_storeu_si256((__m256i*)(q + 32), _mm256_permute4x64_epi64(_mm256_unpackhi_epi64(lo, hi), 0xd8));
        for (int i = 0; i < 8; ++i) dd[(m * np + p) * 8 + i] = a.d[m * a.nb + 2 * p + i / 4];
      }
      for (int64_t b = 0; b * 32 < K; ++b) xg[m * G + b * 32 / group_size] += a.dsum[m * a.nb + b];
    }
  }
};

// [s[g0] x4 | s[g1] x4]: the scales of a 64-column step's two 32-column blocks (g1 is g0 or g0 + 1)
inline __m256 two(const float* s, int64_t g0, int64_t g1) {
  if (g0 == g1) return _mm256_broadcast_ss(s + g0);
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)(s + g0)))),
                                  _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}
inline __m256 two(const c10::BFloat16* s, int64_t g0, int64_t g1) {
  return _mm256_setr_m128(_mm_set1_ps(load1(s + g0)), _mm_set1_ps(load1(s + g1)));
}

// n (2 or 4) scales from p in the low lanes of a 512-bit register (the others unset), as fp32
inline __m512 load4(const float* p, int n) {
  return _mm512_castps128_ps512(n == 4 ? _mm_loadu_ps(p) : _mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)p)));
}
inline __m512 load4(const c10::BFloat16* p, int n) {
  int32_t two_bf16;
  std::memcpy(&two_bf16, p, sizeof two_bf16);
  const __m128i v = n == 4 ? _mm_loadl_epi64((const __m128i*)p) : _mm_cvtsi32_si128(two_bf16);
  return _mm512_castps128_ps512(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(v), 16)));
}

bool AVX512_INT4 = true;  // set_int4_512(false): the 256-bit steps alone (tests compare the two)

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
// 128 columns at a time in 512-bit registers where the CPU has AVX512-VNNI: the same lanes as two 64-column steps
// side by side (x's [even 32 | odd 32] of step p in the low half, of p + 1 in the high half; d and the group scales
// as [step p's 8 | step p + 1's 8]), so half the instructions per weight byte. Returns the first step not done.
template <int MB, int NR, typename S>
int64_t i4_tile512(const Q4Act& x, int64_t m0, const uint8_t* w, int64_t K, const S* s, int64_t gs,
                   __m256 (&out)[MB][NR]) {
  const int64_t half = K / 2, G = x.G, Kp = x.a.Kp;
  const __m512i low = _mm512_set1_epi8(15);
  __m512 acc[MB][NR];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const int8_t* xq = x.a.q + m0 * Kp;
  const float* xdd = x.dd + m0 * x.np * 8;
  // groups of 32 or 64: a step's 4 blocks take groups g0 + [0, 1, 2, 3] or g0 + [0, 0, 1, 1], one load and one permute
  const __m512i spread = gs == 32 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                                  : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  int64_t p = 0;
  for (; 64 * p + 128 <= K; p += 2) {
    const int64_t c = 64 * p;
    __m512i xe[MB], xo[MB];
    for (int m = 0; m < MB; ++m) {
      const int8_t* q = xq + m * Kp + c;
      xe[m] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)q)),
                                 _mm256_loadu_si256((const __m256i*)(q + 64)), 1);
      xo[m] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(q + 32))),
                                 _mm256_loadu_si256((const __m256i*)(q + 96)), 1);
    }
    const int64_t g0 = c / gs, g1 = std::min(G - 1, (c + 32) / gs), g2 = std::min(G - 1, (c + 64) / gs),
                  g3 = std::min(G - 1, (c + 96) / gs);
    for (int r = 0; r < NR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (NR + r) * half + p * 32), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512((const void*)(w + r * half + p * 32));
      const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      const __m512 sv = g0 == g3                ? _mm512_set1_ps(load1(s + r * G + g0))
                        : gs == 32 || gs == 64 ? _mm512_permutexvar_ps(spread, load4(s + r * G + g0, gs == 32 ? 4 : 2))
                                               : _mm512_castpd_ps(_mm512_insertf64x4(
                                       _mm512_castpd256_pd512(_mm256_castps_pd(two(s + r * G, g0, g1))),
                                       _mm256_castps_pd(two(s + r * G, g2, g3)), 1));
      for (int m = 0; m < MB; ++m) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xe[m]), hi, xo[m]);
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d),
                                    _mm512_mul_ps(_mm512_loadu_ps(xdd + (m * x.np + p) * 8), sv), acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r)
      out[m][r] = _mm256_add_ps(_mm512_castps512_ps256(acc[m][r]),
                                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[m][r]), 1)));
  return p;
}
#endif

template <int MB, int NR, typename S>
void i4_tile(const Q4Act& x, int64_t m0, const uint8_t* w, int64_t K, const S* s, const S* z, int64_t gs,
             float* y, int64_t ldy) {
  const int64_t half = K / 2, G = x.G, Kp = x.a.Kp;
  const __m256i low = _mm256_set1_epi8(15);
  __m256 acc[MB][NR];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  const int8_t* xq = x.a.q + m0 * Kp;
  const float* xdd = x.dd + m0 * x.np * 8;
  int64_t p0 = 0;
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  if (AVX512_INT4) p0 = i4_tile512<MB, NR>(x, m0, w, K, s, gs, acc);
#endif
  for (int64_t p = p0; p < x.np; ++p) {
    const int64_t g0 = 64 * p / gs, g1 = std::min(G - 1, (64 * p + 32) / gs);
    __m256i xe[MB], xo[MB];
    for (int m = 0; m < MB; ++m) {
      xe[m] = _mm256_loadu_si256((const __m256i*)(xq + m * Kp + p * 64));
      xo[m] = _mm256_loadu_si256((const __m256i*)(xq + m * Kp + p * 64 + 32));
    }
    for (int r = 0; r < NR; ++r) {
      if (p % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (NR + r) * half + p * 32), _MM_HINT_T0);
      const __m256i v = 64 * p + 64 <= K ? _mm256_loadu_si256((const __m256i*)(w + r * half + p * 32))
                                         : _mm256_inserti128_si256(_mm256_setzero_si256(),
                                               _mm_loadu_si128((const __m128i*)(w + r * half + p * 32)), 0);
      const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      const __m256 sv = two(s + r * G, g0, g1);
      for (int m = 0; m < MB; ++m) {
        const __m256 f = _mm256_cvtepi32_ps(dpbusd(dpbusd(_mm256_setzero_si256(), lo, xe[m]), hi, xo[m]));
        acc[m][r] = _mm256_fmadd_ps(f, _mm256_mul_ps(_mm256_loadu_ps(xdd + (m * x.np + p) * 8), sv), acc[m][r]);
      }
    }
  }
  const __m256 eight = _mm256_set1_ps(8.f);
  for (int m = 0; m < MB; ++m) {
    const float* xg = x.xg + (m0 + m) * G;
    float tail[NR], t[NR];
    for (int r = 0; r < NR; ++r) {  // + Σ_g (z - 8 s) xg: the zero point, through each group's sum of x
      const S *sr = s + r * G, *zr = z + r * G;
      int64_t g = 0;
      for (; g + 8 <= G; g += 8)
        acc[m][r] = _mm256_fmadd_ps(_mm256_fnmadd_ps(eight, load8(sr + g), load8(zr + g)), _mm256_loadu_ps(xg + g),
                                    acc[m][r]);
      tail[r] = 0.f;
      for (; g < G; ++g) tail[r] += (load1(zr + g) - 8.f * load1(sr + g)) * xg[g];
    }
    hsums<NR>(acc[m], tail, t);
    for (int r = 0; r < NR; ++r) y[m * ldy + r] = t[r];
  }
}

// 8 weight rows a tile share each step's activations over more rows: 1.3-1.9x faster than 2 rows a tile for 16-64
// rows of x (256-1024 columns), and 1.06-1.14x than 4 for one row of x on rows of up to 1024 columns (AMD EPYC, 2
// threads). One row of x over longer rows keeps 4: there 8 streams 2 KB apart read memory slower (0.80x at
// 14336 x 4096).
template <int MB, typename S>
void i4_rows(const Q4Act& x, int64_t m0, const uint8_t* w, int64_t K, const S* s, const S* z, int64_t gs,
             int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t half = K / 2, G = x.G;
  int64_t n = n0;
  if (MB > 1 || K <= 1024)
    for (; n + 8 <= n1; n += 8) i4_tile<MB, 8>(x, m0, w + n * half, K, s + n * G, z + n * G, gs, y + n, ldy);
  for (; n + 4 <= n1; n += 4) i4_tile<MB, 4>(x, m0, w + n * half, K, s + n * G, z + n * G, gs, y + n, ldy);
  for (; n < n1; ++n) i4_tile<MB, 1>(x, m0, w + n * half, K, s + n * G, z + n * G, gs, y + n, ldy);
}

// ---- the ops ---------------------------------------------------------------------------------------
at::Tensor int8_q8_mm_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                           const std::optional<at::Tensor>& experts) {
  const int64_t N = w.size(-2), K = w.size(-1);
  check(x, w, K);
  TORCH_CHECK(K % 32 == 0, "woq kernels: int8 activations need K % 32 == 0, got ", K);
  TORCH_CHECK(w.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.numel() == w.numel() / K,
              "woq kernels: int8 weight [.., N, K] and fp32 scales [.., N]");
  TORCH_CHECK(experts.has_value() == (w.dim() == 3), "woq kernels: a stack of weights needs experts");
  const Q8 a(x, 32);
  const int8_t* wp = w.const_data_ptr<int8_t>();
  const float* sp = scales.const_data_ptr<float>();
  return run(x, N, K, experts, [&](int64_t mb, int64_t m, int64_t e, int64_t n0, int64_t n1, float* y) {
    const float* se = sp + e * N;
    const int8_t* we = wp + e * N * K;
    by_rows(mb, [&](auto MB) { i8_rows<decltype(MB)::value>(a, m, we, K, se, n0, n1, y, N); });
  });
}

at::Tensor int4_q8_mm_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                           int64_t group_size, const std::optional<at::Tensor>& experts) {
  const int64_t N = w.size(-2), K = 2 * w.size(-1), G = scales.size(-1);
  check(x, w, K);
  TORCH_CHECK(w.scalar_type() == at::kByte && group_size % 32 == 0 && G * group_size == K,
              "woq kernels: int8 activations need an int4 weight [.., N, K/2] in groups of a multiple of 32");
  TORCH_CHECK(experts.has_value() == (w.dim() == 3), "woq kernels: a stack of weights needs experts");
  const Q4Act a(x, group_size);
  const uint8_t* wp = w.const_data_ptr<uint8_t>();
  const int64_t half = K / 2;
  return with_scales(scales, zeros, w.numel() / half * G, [&](const auto* sp, const auto* zp) {
    return run(x, N, half, experts, [&](int64_t mb, int64_t m, int64_t e, int64_t n0, int64_t n1, float* y) {
      const auto *se = sp + e * N * G, *ze = zp + e * N * G;
      const uint8_t* we = wp + e * N * half;
      by_rows(mb, [&](auto MB) { i4_rows<decltype(MB)::value>(a, m, we, K, se, ze, group_size, n0, n1, y, N); });
    });
  });
}

}  // namespace

namespace tmx {  // ops.h: the registered ops, also called as plain C++ functions (decode_step.cpp)

at::Tensor int8_q8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                      const std::optional<at::Tensor>& experts) {
  const int64_t E = w.dim() == 3 ? w.size(0) : 1;
  return by_expert(x, experts, E, [&](const at::Tensor& xs, const std::optional<at::Tensor>& es) {
    return int8_q8_mm_rows(xs, w, scales, es);
  });
}

at::Tensor int4_q8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                      int64_t group_size, const std::optional<at::Tensor>& experts) {
  const int64_t E = w.dim() == 3 ? w.size(0) : 1;
  return by_expert(x, experts, E, [&](const at::Tensor& xs, const std::optional<at::Tensor>& es) {
    return int4_q8_mm_rows(xs, w, scales, zeros, group_size, es);
  });
}

}  // namespace tmx

// Turns the 512-bit int4 steps on or off (tests compare them with the 256-bit ones); true if this build has them.
bool set_int4_512(bool on) {
  AVX512_INT4 = on;
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY_FRAGMENT(tinymixtral_avx2, m) {
  m.def("set_int4_512(bool on) -> bool", &set_int4_512);
  m.def("int8_q8_mm(Tensor x, Tensor weight, Tensor scales, Tensor? experts) -> Tensor");
  m.def("int4_q8_mm(Tensor x, Tensor weight, Tensor scales, Tensor zeros, int group_size, Tensor? experts) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinymixtral_avx2, CPU, m) {
  m.impl("int8_q8_mm", &tmx::int8_q8_mm);
  m.impl("int4_q8_mm", &tmx::int4_q8_mm);
}
