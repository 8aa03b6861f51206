// The small ops of a decode step (one new token per row), each one C++ call where the plain code runs several
// ATen ops whose fixed costs (dispatch, allocation, waking the thread pool) dwarf their arithmetic at batch 1.
//
// attn_decode(q [B, H, C], k [B, G, T, C], v [B, G, T, C], allowed [B, T] bool, scale) -> y [B, H, C]: softmax
// attention of one query per row and head over the T cached keys it may see (grouped-query: head h reads kv head
// h / (H / G), as SDPA's enable_gqa). Keys and values may be strided views of the cache (unit stride along C).
// route(x [N, D], w [E, D], k) -> (logits [N, E] fp32, weights [N, k] fp32, experts [N, k] int64): Mixtral's router,
// logits = x w^T (rounded to x's dtype first, as the model's product is), softmax over all E, the k largest
// (the lower id first on a tie), renormalised to sum to 1.
// argmax(x [B, V]): the greedy sampler's pick, as torch.argmax(x, -1).
// fp32 or bf16 tensors (the sums in fp32).
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "ops.h"
#include "woq_common.h"

namespace {

using woq::hsum;
using woq::load1;
using woq::load8;

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
  float t = hsum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) t += a[i] * load1(b + i);
  return t;
}

template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t n) {  // y += a x
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load8(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * load1(x + i);
}

// s[j] = e^(s[j] - mx) for j < n; returns their sum
inline float exp_sum(float* s, int64_t n, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 p = woq::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
    _mm256_storeu_ps(s + j, p);
    acc = _mm256_add_ps(acc, p);
  }
  float sum = hsum(acc);
  for (; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
  return sum;
}

inline void store(float v, float* p) { *p = v; }
inline void store(float v, c10::BFloat16* p) { *p = c10::BFloat16(v); }

template <typename T>
void attn_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* allowed, float scale,
               at::Tensor& y) {
  const int64_t B = q.size(0), H = q.size(1), C = q.size(2), G = k.size(1), T_ = k.size(2);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const int64_t kb = k.stride(0), kg = k.stride(1), kt = k.stride(2), vb = v.stride(0), vg = v.stride(1),
                vt = v.stride(2);
  std::vector<int64_t> keys, start(B + 1, 0);  // row b's visible slots: keys[start[b] .. start[b + 1])
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T_; ++t)
      if (allowed[b * T_ + t]) keys.push_back(t);
    start[b + 1] = static_cast<int64_t>(keys.size());
  }
  // threads only for ~256 KB of keys and values a task: a short context's heads cost less than waking the pool
  const int64_t bytes = 2 * C * int64_t(sizeof(T)) * int64_t(keys.size());  // all rows' visible keys and values
  const int64_t per_head = std::max<int64_t>(1, bytes / std::max<int64_t>(1, B));
  woq::parallel_for(0, B * H, std::max<int64_t>(1, (256 << 10) / per_head), [&](int64_t i0, int64_t i1) {
    std::vector<float> s(T_), qf(C), acc(C);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / (H / G);
      for (int64_t c = 0; c < C; ++c) qf[c] = load1(qp + i * C + c) * scale;
      const T* kbg = kp + b * kb + g * kg;
      const T* vbg = vp + b * vb + g * vg;
      const int64_t j0 = start[b], j1 = start[b + 1];
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = j0; j < j1; ++j) mx = std::max(mx, s[j - j0] = dot(qf.data(), kbg + keys[j] * kt, C));
      std::fill(acc.begin(), acc.end(), 0.f);
      const float sum = exp_sum(s.data(), j1 - j0, mx);
      for (int64_t j = j0; j < j1; ++j) axpy(s[j - j0], vbg + keys[j] * vt, acc.data(), C);
      const float inv = sum > 0.f ? 1.f / sum : 0.f;  // no key at all: zeros (never so for a planned step)
      for (int64_t c = 0; c < C; ++c) store(acc[c] * inv, yp + i * C + c);
    }
  });
}

}  // namespace

namespace tmx {  // ops.h: the registered ops, also called as plain C++ functions (decode_step.cpp)

at::Tensor attn_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& allowed,
                       double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "attn_decode: CPU tensors");
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && k.dim() == 4 && v.sizes() == k.sizes(),
              "attn_decode: q [B, H, C] contiguous, k and v [B, G, T, C]");
  const int64_t B = q.size(0), H = q.size(1), C = q.size(2), G = k.size(1), T_ = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == C && G > 0 && H % G == 0, "attn_decode: shapes of q, k, v disagree");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "attn_decode: k and v need unit stride along C");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "attn_decode: q, k, v all fp32 or all bf16");
  TORCH_CHECK(allowed.scalar_type() == at::kBool && allowed.dim() == 2 && allowed.size(0) == B &&
                  allowed.size(1) == T_ && allowed.is_contiguous(),
              "attn_decode: allowed must be bool [B, T], contiguous");
  at::Tensor y = woq::scratch_tensor({B, H, C}, q.options());
  const bool* ok = allowed.const_data_ptr<bool>();
  if (q.scalar_type() == at::kFloat)
    attn_impl<float>(q, k, v, ok, float(scale), y);
  else
    attn_impl<c10::BFloat16>(q, k, v, ok, float(scale), y);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route(const at::Tensor& x, const at::Tensor& w, int64_t top_k) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "route: CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1),
              "route: x [N, D] (unit column stride), w [E, D] contiguous");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "route: x and w both fp32 or both bf16");
  const int64_t N = x.size(0), D = x.size(1), E = w.size(0), K = top_k;
  TORCH_CHECK(K >= 1 && K <= E, "route: top_k must be in 1..E");
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  std::vector<float> copy;
  const float* xf = woq::float_rows(x, copy);
  at::Tensor logits = woq::scratch_tensor({N, E}, x.options().dtype(at::kFloat));
  at::Tensor weights = woq::scratch_tensor({N, K}, x.options().dtype(at::kFloat));
  at::Tensor experts = woq::scratch_tensor({N, K}, x.options().dtype(at::kLong));
  float* lg = logits.mutable_data_ptr<float>();
  float* wt = weights.mutable_data_ptr<float>();
  int64_t* ex = experts.mutable_data_ptr<int64_t>();
  std::vector<float> p(E);
  std::vector<char> taken(E);
  for (int64_t n = 0; n < N; ++n) {
    const float* xn = xf + n * D;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t e = 0; e < E; ++e) {
      float l = bf16 ? float(c10::BFloat16(dot(xn, w.const_data_ptr<c10::BFloat16>() + e * D, D)))
                     : dot(xn, w.const_data_ptr<float>() + e * D, D);
      lg[n * E + e] = l;
      mx = std::max(mx, l);
    }
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(lg[n * E + e] - mx));
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    std::fill(taken.begin(), taken.end(), 0);
    float kept = 0.f;
    for (int64_t j = 0; j < K; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
      taken[best] = 1;
      ex[n * K + j] = best;
      kept += (wt[n * K + j] = p[best]);
    }
    for (int64_t j = 0; j < K; ++j) wt[n * K + j] /= kept;
  }
  return {logits, weights, experts};
}

}  // namespace tmx

namespace {

// argmax(x [B, V] fp32) -> [B] int64: torch.argmax(x, -1) (the first maximum; the first NaN if there is one) in
// two vector passes, where torch's CPU argmax compares one element at a time (70 us for 32,000 logits here).
at::Tensor argmax(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1 && x.size(1) > 0,
              "argmax: fp32 x [B, V] on the CPU, unit stride along V");
  const int64_t B = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const float* p = x.const_data_ptr<float>() + b * x.stride(0);
    __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), nan = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) {
      const __m256 v = _mm256_loadu_ps(p + i);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      mx = _mm256_max_ps(mx, v);
    }
    float m = -std::numeric_limits<float>::infinity();
    bool has_nan = _mm256_movemask_ps(nan) != 0;
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx);
    for (float l : lanes) m = std::max(m, l);
    for (int64_t j = i; j < V; ++j) {
      has_nan |= std::isnan(p[j]);
      m = std::max(m, p[j]);
    }
    int64_t k = 0;
    if (has_nan) {
      while (!std::isnan(p[k])) ++k;
    } else {
      const __m256 mv = _mm256_set1_ps(m);
      for (; k + 8 <= V; k += 8) {
        const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + k), mv, _CMP_EQ_OQ));
        if (hit) {
          k += __builtin_ctz(hit);
          break;
        }
      }
      while (p[k] != m) ++k;
    }
    o[b] = k;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinymixtral_gemv, m) {
  m.def("argmax(Tensor x) -> Tensor");
  m.def("attn_decode(Tensor q, Tensor k, Tensor v, Tensor allowed, float scale) -> Tensor");
  m.def("route(Tensor x, Tensor w, int top_k) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tinymixtral_gemv, CPU, m) {
  m.impl("attn_decode", &tmx::attn_decode);
  m.impl("route", &tmx::route);
  m.impl("argmax", &argmax);
}
