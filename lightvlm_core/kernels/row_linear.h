// The few-row linear of row_linear.cpp, for other kernels of this extension (decode_layers.cpp).
#pragma once
#include <cstdint>

namespace lightvlm {

// out (M, N) = x (M, K) W^T (N, K) (+ bias (N), or nullptr), all dense float32; parallel over the
// weight rows (at::parallel_for)
void row_linear_into(const float* x, int64_t M, const float* w, const float* bias, float* out, int64_t K, int64_t N);

// The same in tasks of consecutive weight rows, for callers that run them on threads of their own:
// row_linear_into runs tasks [0, row_linear_tasks(N)) split as at::parallel_for splits them
int64_t row_linear_tasks(int64_t N);
void row_linear_run(const float* x, int64_t M, const float* w, const float* bias, float* out, int64_t K, int64_t N,
                    int64_t begin, int64_t end);

}  // namespace lightvlm
