// The decode step's cache append + attention of decode_attention.cpp, for other kernels of this
// extension (decode_layers.cpp). Arguments as lightvlm::cpu_decode_attention's schema.
#pragma once
#include <ATen/ATen.h>

namespace lightvlm {

at::Tensor cpu_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor keys,
                                at::Tensor values, at::Tensor lengths, const at::Tensor& rows,
                                const at::Tensor& masks, const at::Tensor& plan, at::Tensor scores,
                                const at::Tensor& score_rows, int64_t layer, double scale);

}  // namespace lightvlm
