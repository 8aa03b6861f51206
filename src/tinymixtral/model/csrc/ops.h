// The ops of the other files as plain C++ functions (no dispatcher), for decode_step.cpp's fused step: each is the
// registered op itself (defined at the end of its file).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace tmx {
at::Tensor mv(const at::Tensor& x, const at::Tensor& w);
at::Tensor experts_mv(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& experts,
                      const at::Tensor& weights);
at::Tensor attn_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& allowed,
                       double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> route(const at::Tensor& x, const at::Tensor& w, int64_t top_k);
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                   const std::optional<at::Tensor>& experts);
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                   int64_t group_size, const std::optional<at::Tensor>& experts);
at::Tensor int8_q8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                      const std::optional<at::Tensor>& experts);
at::Tensor int4_q8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                      int64_t group_size, const std::optional<at::Tensor>& experts);
}  // namespace tmx
