// fp32 / bf16-weight products for a few rows (batch-1 decode) on AVX2 + FMA, summed in fp32.
//
// mv(x [M, K], w [N, K]) -> y [M, N] = x @ w^T: each weight row is read once for all M rows of x (up to
// 4 at a time): for one row of x one weight row at a time (two FMA chains), for more 4 or 2 rows per inner
// iteration; all threads over blocks of output rows (woq::parallel_for: torch's pool, or the fused step's team;
// a small weight stays on one thread).
// experts_mv(x [N, D], w13 [E, 2F, D], w2 [E, D, F], experts [N, K], weights [N, K]) -> y [N, D]: the
// whole SwiGLU expert sum of a few tokens, Σ_k weights[n,k] * w2_e (silu(w1_e x) * w3_e x) with
// e = experts[n,k] (w1 the first F rows of w13, w3 the last F), in two parallel passes; only the chosen
// experts' weights are read, each once for up to 4 of the tokens that chose it.
// Weights fp32 or bf16 (x in the same dtype; the products and sums in fp32, the output in x's dtype).
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "ops.h"
#include "woq_common.h"

namespace {

using woq::by_rows;
using woq::hsum;
using woq::load1;
using woq::load8;
using woq::silu;

// Prefetch this many bytes ahead in each row (into the next rows at its end). tiny-mixtral's fp32 decode reads
// ~288 MB a token from memory: 8 KB ahead ran it 1.04-1.07x llama.cpp's F32, 2 KB 0.95-0.99x (alternating runs,
// Intel Xeon, 2 threads); on b.json, whose weights stay in L3, no difference. (Prefetching 2 or 4 tiles ahead in
// the int8/int4 kernels, woq_q8.cpp, made no difference.)
constexpr int64_t PF = 8192;

// NR weight rows (stride K) times MB rows of x (fp32, stride ldx) -> y[m * ldy + r].
template <int MB, int NR, typename W>
inline void tile(const float* x, int64_t ldx, const W* w, int64_t K, float* y, int64_t ldy) {
  constexpr int A = MB == 1 ? 2 : 1;  // one row of x: two accumulators a row (independent FMA chains)
  __m256 acc[MB][NR][A];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r)
      for (int a = 0; a < A; ++a) acc[m][r][a] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256 w0[NR], w1[NR];
    for (int r = 0; r < NR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k + PF / sizeof(W)), _MM_HINT_T0);
      w0[r] = load8(w + r * K + k);
      w1[r] = load8(w + r * K + k + 8);
    }
    for (int m = 0; m < MB; ++m) {
      __m256 x0 = load8(x + m * ldx + k), x1 = load8(x + m * ldx + k + 8);
      for (int r = 0; r < NR; ++r) {
        acc[m][r][0] = _mm256_fmadd_ps(w0[r], x0, acc[m][r][0]);
        acc[m][r][A - 1] = _mm256_fmadd_ps(w1[r], x1, acc[m][r][A - 1]);
      }
    }
  }
  for (; k + 8 <= K; k += 8)
    for (int m = 0; m < MB; ++m) {
      __m256 xv = load8(x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[m][r][0] = _mm256_fmadd_ps(load8(w + r * K + k), xv, acc[m][r][0]);
    }
  for (int m = 0; m < MB; ++m) {
    __m256 v[NR];
    float tail[NR], t[NR];
    for (int r = 0; r < NR; ++r) {
      v[r] = A == 2 ? _mm256_add_ps(acc[m][r][0], acc[m][r][A - 1]) : acc[m][r][0];
      tail[r] = 0.f;
      for (int64_t kk = k; kk < K; ++kk) tail[r] += load1(w + r * K + kk) * x[m * ldx + kk];
    }
    woq::hsums<NR>(v, tail, t);
    for (int r = 0; r < NR; ++r) y[m * ldy + r] = t[r];
  }
}

// Output rows [n0, n1) of w (stride K) for MB rows of x.
template <int MB, typename W>
void rows(const float* x, int64_t ldx, const W* w, int64_t K, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  // One row of x: one weight row at a time (one stream a thread for the prefetchers): 1.16-1.34x faster than 4 rows
  // a tile from L3 or memory (AMD EPYC, 2 threads, 8192 x 256 to 32000 x 512), 0.87-0.94x on a matrix hot in L2,
  // which a decode step's weights never are (each token reads tens of MB between two uses of one matrix).
  constexpr int NR = MB == 1 ? 1 : MB == 2 ? 4 : 2;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile<MB, NR>(x, ldx, w + n * K, K, y + n, ldy);
  for (; n < n1; ++n) tile<MB, 1>(x, ldx, w + n * K, K, y + n, ldy);
}

template <typename W>
void rows_m(int64_t mb, const float* x, int64_t ldx, const W* w, int64_t K, int64_t n0, int64_t n1, float* y,
            int64_t ldy) {
  by_rows(mb, [&](auto MB) { rows<decltype(MB)::value>(x, ldx, w, K, n0, n1, y, ldy); });
}

constexpr int64_t BLOCK = 16;  // output rows per parallel work item

// Work items of at least ~32 KB of weights, so a small matrix stays on one thread (no parallel region).
inline int64_t grain(int64_t row_bytes) { return std::max<int64_t>(1, (32 << 10) / (BLOCK * row_bytes)); }

void check_dtypes(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gemv: CPU tensors");
  TORCH_CHECK((w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) &&
                  x.scalar_type() == w.scalar_type(),
              "gemv: x and w both fp32 or both bf16, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "gemv: x must be [M, K] with unit column stride");
  TORCH_CHECK(w.is_contiguous(), "gemv: contiguous weights");
}

template <typename W>
void mv_impl(const float* x, int64_t M, const W* w, int64_t N, int64_t K, float* y) {
  const int64_t blocks = (N + BLOCK - 1) / BLOCK;
  woq::parallel_for(0, blocks, grain(K * sizeof(W)), [&](int64_t b0, int64_t b1) {
    for (int64_t m = 0; m < M; m += 4)
      rows_m(std::min<int64_t>(4, M - m), x + m * K, K, w, K, b0 * BLOCK, std::min(N, b1 * BLOCK), y + m * N, N);
  });
}

}  // namespace

namespace tmx {  // ops.h: the registered ops, also called as plain C++ functions (decode_step.cpp)

at::Tensor mv(const at::Tensor& x, const at::Tensor& w) {
  check_dtypes(x, w);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "gemv: w must be [N, K] with K = x.size(1)");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  std::vector<float> copy;
  const float* xf = woq::float_rows(x, copy);
  at::Tensor y = woq::scratch_tensor({M, N}, x.options().dtype(at::kFloat));
  if (w.scalar_type() == at::kFloat)
    mv_impl(xf, M, w.const_data_ptr<float>(), N, K, y.mutable_data_ptr<float>());
  else
    mv_impl(xf, M, w.const_data_ptr<c10::BFloat16>(), N, K, y.mutable_data_ptr<float>());
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace tmx

namespace {

// The assignments a = n * K + k sorted by expert (stable), cut into runs of up to 4 of one expert: each run
// reads its expert's weights once (a few tokens' prefill: ~4 tokens an expert; a decode step: one run each).
struct Runs {
  std::vector<int64_t> order, first;  // order[i]: the i-th assignment by expert; run c is order[first[c]..first[c+1])
  Runs(const int64_t* e, int64_t A) : order(woq::order_by_expert(e, A)), first(woq::runs_of_four(e, order.data(), A)) {}
  int64_t size() const { return static_cast<int64_t>(first.size()) - 1; }
};

template <typename W>
void experts_impl(const float* x, int64_t N, int64_t D, int64_t F, int64_t K, const W* w13, const W* w2,
                  const int64_t* e, const float* wt, float* y, bool round_bf16) {
  const int64_t A = N * K;
  const Runs runs(e, A);
  std::vector<float> xs(A * D), h(A * F), z(A * D);  // by sorted assignment i: its token's x, its h, its w2 h
  for (int64_t i = 0; i < A; ++i) std::copy(x + runs.order[i] / K * D, x + (runs.order[i] / K + 1) * D, &xs[i * D]);
  // pass 1: h[i, :] = silu(w1_e x) * w3_e x, over (run, block of F rows)
  const int64_t fb = (F + BLOCK - 1) / BLOCK;
  woq::parallel_for(0, runs.size() * fb, grain(2 * D * sizeof(W)), [&](int64_t b0, int64_t b1) {
    float g[4 * BLOCK], u[4 * BLOCK];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c = b / fb, i0 = runs.first[c], mb = runs.first[c + 1] - i0;
      const int64_t j0 = (b % fb) * BLOCK, j1 = std::min(F, j0 + BLOCK);
      const W* we = w13 + e[runs.order[i0]] * 2 * F * D;
      rows_m(mb, &xs[i0 * D], D, we + j0 * D, D, 0, j1 - j0, g, BLOCK);
      rows_m(mb, &xs[i0 * D], D, we + (F + j0) * D, D, 0, j1 - j0, u, BLOCK);
      for (int64_t m = 0; m < mb; ++m)
        for (int64_t j = j0; j < j1; ++j) {
          float gj = g[m * BLOCK + j - j0], uj = u[m * BLOCK + j - j0];
          if (round_bf16) {  // as the bf16 model rounds each product, and silu's output, to bf16
            gj = float(c10::BFloat16(gj));
            uj = float(c10::BFloat16(uj));
            h[(i0 + m) * F + j] = float(c10::BFloat16(float(c10::BFloat16(silu(gj))) * uj));
          } else {
            h[(i0 + m) * F + j] = silu(gj) * uj;
          }
        }
    }
  });
  // pass 2: z[i, d] = w2_e[d] . h[i], over (run, block of D rows)
  const int64_t db = (D + BLOCK - 1) / BLOCK;
  woq::parallel_for(0, runs.size() * db, grain(F * sizeof(W)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c = b / db, i0 = runs.first[c], mb = runs.first[c + 1] - i0;
      const int64_t d0 = (b % db) * BLOCK, d1 = std::min(D, d0 + BLOCK);
      rows_m(mb, &h[i0 * F], F, w2 + (e[runs.order[i0]] * D + d0) * F, F, 0, d1 - d0, &z[i0 * D + d0], D);
    }
  });
  // y[n] = Σ_k wt[n, k] z[n, k], in k's order
  std::vector<int64_t> sorted_at(A);  // assignment -> its position in runs.order
  for (int64_t i = 0; i < A; ++i) sorted_at[runs.order[i]] = i;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < D; ++d) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += wt[n * K + k] * z[sorted_at[n * K + k] * D + d];
      y[n * D + d] = s;
    }
}

}  // namespace

namespace tmx {  // ops.h: the registered ops, also called as plain C++ functions (decode_step.cpp)

at::Tensor experts_mv(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& experts,
                      const at::Tensor& weights) {
  check_dtypes(x, w13);
  TORCH_CHECK(w2.scalar_type() == w13.scalar_type() && w2.is_contiguous(), "gemv: w2 like w13, contiguous");
  const int64_t N = x.size(0), D = x.size(1), E = w13.size(0), F = w13.size(1) / 2, K = experts.size(1);
  TORCH_CHECK(w13.dim() == 3 && w13.size(1) == 2 * F && w13.size(2) == D && w2.dim() == 3 && w2.size(0) == E &&
                  w2.size(1) == D && w2.size(2) == F,
              "gemv: w13 [E, 2F, D] and w2 [E, D, F]");
  TORCH_CHECK(experts.scalar_type() == at::kLong && experts.dim() == 2 && experts.size(0) == N &&
                  experts.is_contiguous() && weights.scalar_type() == at::kFloat && weights.sizes() == experts.sizes() &&
                  weights.is_contiguous(),
              "gemv: experts int64 [N, K] and fp32 weights [N, K]");
  const int64_t* e = experts.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N * K; ++i) TORCH_CHECK(e[i] >= 0 && e[i] < E, "gemv: expert id out of range");
  std::vector<float> copy;
  const float* xf = woq::float_rows(x, copy);
  std::vector<float> wt(weights.const_data_ptr<float>(), weights.const_data_ptr<float>() + N * K);
  at::Tensor y = woq::scratch_tensor({N, D}, x.options().dtype(at::kFloat));
  if (w13.scalar_type() == at::kFloat) {
    experts_impl(xf, N, D, F, K, w13.const_data_ptr<float>(), w2.const_data_ptr<float>(), e, wt.data(),
                 y.mutable_data_ptr<float>(), false);
  } else {
    for (float& v : wt) v = float(c10::BFloat16(v));  // the model multiplies by the weights cast to its dtype
    experts_impl(xf, N, D, F, K, w13.const_data_ptr<c10::BFloat16>(), w2.const_data_ptr<c10::BFloat16>(), e,
                 wt.data(), y.mutable_data_ptr<float>(), true);
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace tmx

TORCH_LIBRARY(tinymixtral_gemv, m) {
  m.def("mv(Tensor x, Tensor w) -> Tensor");
  m.def("experts_mv(Tensor x, Tensor w13, Tensor w2, Tensor experts, Tensor weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinymixtral_gemv, CPU, m) {
  m.impl("mv", &tmx::mv);
  m.impl("experts_mv", &tmx::experts_mv);
}
