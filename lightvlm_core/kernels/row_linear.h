// The few-row linear of row_linear.cpp, for other kernels of this extension (decode_layers.cpp).
#pragma once
#include <cstdint>

namespace lightvlm {

// out (M, N) = x (M, K) W^T (N, K) (+ bias (N), or nullptr), all dense float32; parallel over the
// weight rows (at::parallel_for)
void row_linear_into(const float* x, int64_t M, const float* w, const float* bias, float* out, int64_t K, int64_t N);

}  // namespace lightvlm
