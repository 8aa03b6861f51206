// A whole decode step (one new token per row, B <= 16 rows, fp32 activations) as one op, as llama.cpp runs its
// graph: embedding -> per layer RMSNorm, q/k/v product, rotary, cache write, attention, output product, RMSNorm,
// router, experts (or the dense FFN) -> RMSNorm -> head. The products, the attention and the router are the other
// files' kernels called as plain functions (ops.h); the small ops between them (norms, rotary, residual adds,
// SwiGLU, the cache write and the mask) are loops over a few hundred floats. Everywhere else a step is ~10 ops a
// layer, each with its dispatch, allocation and (compiled) boxed call: 0.1-0.15 ms of a 0.4 ms int4 step here.
//
// decode_step(ids [B, S], pos [B, S], k, v [L, B, G, T, C] (written at slots slot .. slot + S - 1), cache_pos [B, T]
// (pos written there), slot, plan) -> logits of each row's last token [B, V] fp32. ids may be [B] (S = 1), and pos
// any shape with B S elements. plan: a DecodePlan(weights, meta, inv_freq [C/2], eps), made once per generation
// (a list of ~65 tensors converted at every call cost ~8 us).
// S = 1 is a decode step; S > 1 a short prompt (B S <= 16 rows), its tokens written before attention reads the
// cache, so it must not wrap (slot + S <= T; the caller also keeps it to a cache that never wrapped, where no
// new key overwrites one an earlier token of the prompt still sees) and each query sees the new keys its position
// allows.
// meta: D, L, H, G, C, E (0: dense FFN), top-k, window (0: none), then (kind, group size) of each product in the
// order below. weights, in order: embedding [V, D], final norm [D], head; then per layer: attention norm, wqkv,
// wo, FFN norm, (router [E, D], w13 stack, w2 stack) or (w13, w2). A product is one tensor of kind F32 (fp32
// [N, K] or a stack [E, N, K]), two of I8Q8 / I8 (int8 weight, fp32 scales) or three of I4Q8 / I4 (packed int4
// weight, scales, zeros); Q8 kinds quantize the activations (woq_q8.cpp), the others keep them exact.
#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <mutex>
#include <vector>

#include "ops.h"
#include "woq_common.h"

namespace {

struct DecodePlan : torch::CustomClassHolder {
  std::vector<at::Tensor> weights;
  std::vector<int64_t> meta;
  at::Tensor inv_freq;
  double eps;
  woq::Arena arena;  // the step's tensors, kept for the next step (team.h)
  std::mutex busy;   // held by the step using the arena (another thread's step at once goes without)
  DecodePlan(std::vector<at::Tensor> w, std::vector<int64_t> m, at::Tensor f, double e)
      : weights(std::move(w)), meta(std::move(m)), inv_freq(std::move(f)), eps(e) {}
};

enum Kind : int64_t { F32 = 0, I8Q8 = 1, I8 = 2, I4Q8 = 3, I4 = 4 };

struct Product {
  int64_t kind = F32, group_size = 0;
  const at::Tensor *w = nullptr, *s = nullptr, *z = nullptr;

  at::Tensor operator()(const at::Tensor& x, const std::optional<at::Tensor>& experts = std::nullopt) const {
    switch (kind) {
      case F32: return tmx::mv(x, *w);
      case I8Q8: return tmx::int8_q8_mm(x, *w, *s, experts);
      case I8: return tmx::int8_mm(x, *w, *s, experts);
      case I4Q8: return tmx::int4_q8_mm(x, *w, *s, *z, group_size, experts);
      case I4: return tmx::int4_mm(x, *w, *s, *z, group_size, experts);
    }
    TORCH_CHECK(false, "decode_step: unknown product kind ", kind);
  }
};

struct Reader {
  at::TensorList t;
  at::IntArrayRef m;
  size_t ti = 0, mi = 4 * 2;  // meta's first 8 are the shapes

  const at::Tensor& tensor() {
    TORCH_CHECK(ti < t.size(), "decode_step: too few weights");
    return t[ti++];
  }
  Product product() {
    TORCH_CHECK(mi + 2 <= m.size(), "decode_step: too few products in meta");
    Product p;
    p.kind = m[mi++];
    p.group_size = m[mi++];
    p.w = &tensor();
    if (p.kind != F32) p.s = &tensor();
    if (p.kind == I4Q8 || p.kind == I4) p.z = &tensor();
    return p;
  }
};

const float* f32(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, "decode_step: ", what,
              " must be fp32, contiguous, with ", n, " elements");
  return t.const_data_ptr<float>();
}

// y = w * (x / rms(x)), the model's order (normalise, then scale)
void rms_norm(const float* x, const float* w, int64_t B, int64_t D, double eps, float* y) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * D;
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) ss += xb[d] * xb[d];
    const float r = 1.f / std::sqrt(ss / float(D) + float(eps));
    for (int64_t d = 0; d < D; ++d) y[b * D + d] = w[d] * (xb[d] * r);
  }
}

// rotate one head's C values (rotate-half layout: i pairs with i + C/2)
void rope(float* x, const float* cs, const float* sn, int64_t C) {
  const int64_t h = C / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cs[i] - b * sn[i];
    x[i + h] = b * cs[i] + a * sn[i];
  }
}

at::Tensor step(const at::Tensor& ids, const at::Tensor& pos, at::Tensor& k, at::Tensor& v, at::Tensor& cache_pos,
                int64_t slot, const DecodePlan& plan) {
  const at::TensorList weights(plan.weights);
  const at::IntArrayRef meta(plan.meta);
  const at::Tensor& inv_freq = plan.inv_freq;
  const double eps = plan.eps;
  TORCH_CHECK(meta.size() >= 8, "decode_step: meta needs the 8 shapes");
  const int64_t D = meta[0], L = meta[1], H = meta[2], G = meta[3], C = meta[4], E = meta[5], K = meta[6],
                W = meta[7];
  TORCH_CHECK(ids.scalar_type() == at::kLong && pos.scalar_type() == at::kLong && ids.is_contiguous() &&
                  pos.is_contiguous() && (ids.dim() == 1 || ids.dim() == 2) && pos.numel() == ids.numel(),
              "decode_step: ids int64 [B, S] (or [B]: S = 1), pos int64 with as many");
  const int64_t B = ids.size(0), S = ids.dim() == 2 ? ids.size(1) : 1, N = B * S, T = k.size(3);
  TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && k.is_contiguous() &&
                  v.is_contiguous() && k.dim() == 5 && k.sizes() == v.sizes() && k.size(0) == L &&
                  k.size(1) == B && k.size(2) == G && k.size(4) == C,
              "decode_step: k and v fp32 [L, B, G, T, C], contiguous");
  TORCH_CHECK(cache_pos.scalar_type() == at::kLong && cache_pos.is_contiguous() && cache_pos.dim() == 2 &&
                  cache_pos.size(0) == B && cache_pos.size(1) == T,
              "decode_step: cache_pos int64 [B, T]");
  TORCH_CHECK(slot >= 0 && slot + S <= T && H % G == 0 && C % 2 == 0, "decode_step: bad slot or heads");
  Reader rd{weights, meta};
  const at::Tensor& embed = rd.tensor();
  TORCH_CHECK(embed.scalar_type() == at::kFloat && embed.is_contiguous() && embed.dim() == 2 && embed.size(1) == D,
              "decode_step: fp32 embedding [V, D]");
  const float* final_norm = f32(rd.tensor(), D, "the final norm");
  const Product head = rd.product();

  const auto opts = embed.options();
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  int64_t* cp = cache_pos.mutable_data_ptr<int64_t>();
  const float* f = f32(inv_freq, C / 2, "inv_freq");
  std::vector<float> x(N * D), cs(N * C / 2), sn(N * C / 2);
  for (int64_t n = 0; n < N; ++n) {  // row n: row n / S's token n % S
    TORCH_CHECK(idp[n] >= 0 && idp[n] < embed.size(0), "decode_step: token id out of range");
    std::copy_n(embed.const_data_ptr<float>() + idp[n] * D, D, &x[n * D]);
    const float p = float(std::max<int64_t>(pp[n], 0));
    for (int64_t i = 0; i < C / 2; ++i) {
      const float a = p * f[i];
      cs[n * C / 2 + i] = std::cos(a);
      sn[n * C / 2 + i] = std::sin(a);
    }
    cp[n / S * T + slot + n % S] = pp[n];
  }
  // which slots each query may see: causal, within the window, never an empty slot (pos -1); a padding query
  // (pos -1) any (its output is never read)
  at::Tensor allowed = woq::scratch_tensor({N, T}, opts.dtype(at::kBool));
  bool* ok = allowed.mutable_data_ptr<bool>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t kp = cp[n / S * T + t], q = pp[n];
      ok[n * T + t] = (kp >= 0 && kp <= q && (W == 0 || kp > q - W)) || q < 0;
    }
  const double scale = std::pow(double(C), -0.5);
  at::Tensor h = woq::scratch_tensor({N, D}, opts), q = woq::scratch_tensor({N, H, C}, opts);
  float* hp = h.mutable_data_ptr<float>();
  float* kc = k.mutable_data_ptr<float>();
  float* vc = v.mutable_data_ptr<float>();
  const int64_t QKV = (H + 2 * G) * C;
  for (int64_t l = 0; l < L; ++l) {
    rms_norm(x.data(), f32(rd.tensor(), D, "an attention norm"), N, D, eps, hp);
    const Product wqkv = rd.product(), wo = rd.product();
    const at::Tensor qkv = wqkv(h);
    TORCH_CHECK(qkv.size(1) == QKV, "decode_step: wqkv gives ", qkv.size(1), " outputs, not ", QKV);
    float* y = qkv.mutable_data_ptr<float>();
    float* qp = q.mutable_data_ptr<float>();
    for (int64_t n = 0; n < N; ++n) {
      float* yn = y + n * QKV;
      for (int64_t j = 0; j < H + G; ++j) rope(yn + j * C, &cs[n * C / 2], &sn[n * C / 2], C);
      std::copy_n(yn, H * C, qp + n * H * C);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t at = (((l * B + n / S) * G + g) * T + slot + n % S) * C;
        std::copy_n(yn + (H + g) * C, C, kc + at);
        std::copy_n(yn + (H + G + g) * C, C, vc + at);
      }
    }
    const at::Tensor kl = k.select(0, l), vl = v.select(0, l);
    at::Tensor att;
    if (S == 1) {
      att = tmx::attn_decode(q, kl, vl, allowed, scale);
    } else {  // row b's S queries over its own cache: the keys a view repeated S times (stride 0)
      att = woq::scratch_tensor({N, H, C}, opts);
      for (int64_t b = 0; b < B; ++b) {
        const at::Tensor a = tmx::attn_decode(q.narrow(0, b * S, S), kl.narrow(0, b, 1).expand({S, G, T, C}),
                                              vl.narrow(0, b, 1).expand({S, G, T, C}), allowed.narrow(0, b * S, S),
                                              scale);
        std::copy_n(a.const_data_ptr<float>(), S * H * C, att.mutable_data_ptr<float>() + b * S * H * C);
      }
    }
    const at::Tensor o = wo(att.view({N, H * C}));
    const float* op = o.const_data_ptr<float>();
    for (int64_t i = 0; i < N * D; ++i) x[i] += op[i];

    rms_norm(x.data(), f32(rd.tensor(), D, "an FFN norm"), N, D, eps, hp);
    at::Tensor ffn;
    if (E > 0) {
      const at::Tensor& router = rd.tensor();
      const Product w13 = rd.product(), w2 = rd.product();
      auto routed = tmx::route(h, router, K);
      const at::Tensor& wts = std::get<1>(routed);
      const at::Tensor& ex = std::get<2>(routed);
      if (w13.kind == F32) {
        ffn = tmx::experts_mv(h, *w13.w, *w2.w, ex, wts);
      } else {  // row n K + j: token n through its j-th expert, both products; then the weighted sum
        at::Tensor xs = woq::scratch_tensor({N * K, D}, opts);
        float* xsp = xs.mutable_data_ptr<float>();
        for (int64_t r = 0; r < N * K; ++r) std::copy_n(hp + (r / K) * D, D, xsp + r * D);
        const at::Tensor e_flat = ex.view({N * K});
        const at::Tensor gu = w13(xs, e_flat);
        const int64_t F = gu.size(1) / 2;
        at::Tensor act = woq::scratch_tensor({N * K, F}, opts);
        const float* g = gu.const_data_ptr<float>();
        float* a = act.mutable_data_ptr<float>();
        for (int64_t r = 0; r < N * K; ++r) woq::swiglu(g + r * 2 * F, g + r * 2 * F + F, a + r * F, F);
        const at::Tensor z = w2(act, e_flat);
        const float* zp = z.const_data_ptr<float>();
        const float* wp = wts.const_data_ptr<float>();
        ffn = woq::scratch_tensor({N, D}, opts);
        float* fp = ffn.mutable_data_ptr<float>();
        for (int64_t n = 0; n < N; ++n)
          for (int64_t d = 0; d < D; ++d) {
            float s = 0.f;
            for (int64_t j = 0; j < K; ++j) s += zp[(n * K + j) * D + d] * wp[n * K + j];
            fp[n * D + d] = s;
          }
      }
    } else {
      const Product w13 = rd.product(), w2 = rd.product();
      const at::Tensor gu = w13(h);
      const int64_t F = gu.size(1) / 2;
      at::Tensor act = woq::scratch_tensor({N, F}, opts);
      const float* g = gu.const_data_ptr<float>();
      float* a = act.mutable_data_ptr<float>();
      for (int64_t n = 0; n < N; ++n) woq::swiglu(g + n * 2 * F, g + n * 2 * F + F, a + n * F, F);
      ffn = w2(act);
    }
    const float* fp = ffn.const_data_ptr<float>();
    for (int64_t i = 0; i < N * D; ++i) x[i] += fp[i];
  }
  TORCH_CHECK(rd.ti == weights.size() && rd.mi == meta.size(), "decode_step: weights or meta left over");
  std::vector<float> last(B * D);  // each row's last token: the head over the vocabulary for it alone
  for (int64_t b = 0; b < B; ++b) std::copy_n(&x[(b * S + S - 1) * D], D, &last[b * D]);
  at::Tensor hl = woq::scratch_tensor({B, D}, opts);
  rms_norm(last.data(), final_norm, B, D, eps, hl.mutable_data_ptr<float>());
  woq::ArenaScope fresh(nullptr);  // the logits leave the step: a tensor of their own
  return head(hl);
}

bool TEAM = true;  // set_team(false): a region per product, as the ops outside the step (tests compare the two)

// the step with one team of threads for all its products (team.h)
at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& pos, at::Tensor& k, at::Tensor& v,
                       at::Tensor& cache_pos, int64_t slot, const c10::intrusive_ptr<DecodePlan>& plan) {
  std::unique_lock<std::mutex> lock(plan->busy, std::try_to_lock);
  woq::ArenaScope scope(lock.owns_lock() ? &plan->arena : nullptr);
  if (!TEAM) return step(ids, pos, k, v, cache_pos, slot, *plan);
  return woq::with_team([&] { return step(ids, pos, k, v, cache_pos, slot, *plan); });
}

bool set_team(bool on) {
  const bool was = TEAM;
  TEAM = on;
  return was;
}

int64_t team_shares() { return woq::shares_handed.load(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinymixtral_gemv, m) {
  m.class_<DecodePlan>("DecodePlan").def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, at::Tensor, double>());
  m.def("set_team(bool on) -> bool", &set_team);
  m.def("team_shares() -> int", &team_shares);
  m.def(
      "decode_step(Tensor ids, Tensor pos, Tensor(a!) k, Tensor(b!) v, Tensor(c!) cache_pos, int slot, "
      "__torch__.torch.classes.tinymixtral_gemv.DecodePlan plan) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinymixtral_gemv, CPU, m) { m.impl("decode_step", &decode_step); }
