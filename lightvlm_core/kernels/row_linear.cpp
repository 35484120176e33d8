// lightvlm::row_linear on CPU (AVX-512, float32): x W^T (+ bias) for a few rows of x (a decode step
// of up to 8 rows, taken 4 at a time), a memory-bound pass over the weight. Registered for the
// schema defined in lightvlm_core/cpu_linear.py, built with the attention kernels (cpu_kernels.py).
//
// Why not inductor's multiply-sum (cpu_linear.RowLinear): inductor inlines the producer of x (an
// RMSNorm: a division and a square root) into the reduction over each weight row, so it is computed
// again for every 16 weights of every output, and the weight streams at a third of the bandwidth.
// Here x is an input, each weight row is read once for all rows of x, the outputs are spread over
// the threads in blocks of weight rows.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <optional>

#include "row_linear.h"
#include "sum16.h"

namespace {

// weight rows per parallel task (tried 16-96 on an AMD EPYC VM: within its noise of each other; on
// 2048-wide layers, fewer rows so that a block stays in L2 for every 4 rows of x: no faster either)
constexpr int64_t kRowsPerTask = 48;

// With 3-4 rows of x, the tile loop issues too few loads per multiply-add for the hardware prefetcher
// to keep the memory busy: it fetches the weights this far ahead itself. Measured on the 32 layers
// of `cpu-small` (AMD EPYC VM, 2 threads; scripts/bench_row_linear.py --base, two runs): 3 rows
// 0.95-0.98x the time, 4 rows 0.89-0.95x, 6 rows 0.82-0.84x, 8 rows 0.79-0.82x (4-16 KB ahead
// within a few percent of each other). With 1-2 rows the loop keeps the memory as busy as it gets
// without them, and the prefetches only cost issue slots (2 rows 1.10x, 1 row 1.08-1.18x).
constexpr int64_t kPrefetchFloats = 8192 / sizeof(float);

// out[m][n0:n1] for M rows of x: R weight rows at a time, M x R <= 16 accumulators summed together
// by sum16
template <int M, int R, bool Prefetch>
void rows(const float* x, const float* w, const float* bias, float* out, int64_t K, int64_t N, int64_t n0,
          int64_t n1) {
  const int64_t full = K & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - full)) - 1);
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m512 acc[16];  // M x R used, the rest stay zero
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    const float* wn = w + n * K;
    for (int64_t k = 0; k < full; k += 16) {
      __m512 wv[R];
      if constexpr (Prefetch)
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(wn + kPrefetchFloats + r * K + k), _MM_HINT_T0);
      for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(wn + r * K + k);
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[m * R + r] = _mm512_fmadd_ps(xv, wv[r], acc[m * R + r]);
      }
    }
    // the masked loads only for the last, partial block: masked on every block (as before), one row's
    // pass over `cpu-small` took 1.10x the time (scripts/bench_row_linear.py --base, AMD EPYC VM)
    if (full < K) {
      __m512 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_ps(tail, wn + r * K + full);
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * K + full);
        for (int r = 0; r < R; ++r) acc[m * R + r] = _mm512_fmadd_ps(xv, wv[r], acc[m * R + r]);
      }
    }
    alignas(64) float sums[16];  // lane m * R + r: row m of x, weight row n + r
    _mm512_store_ps(sums, sum16(acc));
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) out[m * N + n + r] = sums[m * R + r] + (bias != nullptr ? bias[n + r] : 0.f);
  }
  // the last weight rows, one at a time
  for (; n < n1; ++n) {
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = k < full ? __mmask16(0xFFFF) : tail;
      const __m512 wv = _mm512_maskz_loadu_ps(mask, w + n * K + k);
      for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + m * K + k), wv, acc[m]);
    }
    for (int m = 0; m < M; ++m) out[m * N + n] = _mm512_reduce_add_ps(acc[m]) + (bias != nullptr ? bias[n] : 0.f);
  }
}

// rows<M, R> fetching its weights ahead where it is the first pass over them
template <int M, int R>
void tiles(bool first, const float* x, const float* w, const float* bias, float* out, int64_t K, int64_t N,
           int64_t n0, int64_t n1) {
  if (first) rows<M, R, true>(x, w, bias, out, K, N, n0, n1);
  else rows<M, R, false>(x, w, bias, out, K, N, n0, n1);
}

}  // namespace

namespace lightvlm {

int64_t row_linear_tasks(int64_t N) { return (N + kRowsPerTask - 1) / kRowsPerTask; }

void row_linear_run(const float* xp, int64_t M, const float* wp, const float* bp, float* op, int64_t K, int64_t N,
                    int64_t begin, int64_t end) {
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n0 = task * kRowsPerTask, n1 = std::min(N, n0 + kRowsPerTask);
    // 4 rows of x at a time over the task's weight rows: the first 4 fetch them from memory, the
    // next 4 read them from L1/L2 (the block is 48 weight rows: 48 KB at 256 wide)
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const float* xm = xp + m0 * K;
      float* om = op + m0 * N;
      const bool first = m0 == 0;
      switch (std::min<int64_t>(4, M - m0)) {
        case 1: rows<1, 16, false>(xm, wp, bp, om, K, N, n0, n1); break;
        case 2: rows<2, 8, false>(xm, wp, bp, om, K, N, n0, n1); break;
        case 3: tiles<3, 5>(first, xm, wp, bp, om, K, N, n0, n1); break;
        default: tiles<4, 4>(first, xm, wp, bp, om, K, N, n0, n1); break;
      }
    }
  }
}

void row_linear_into(const float* xp, int64_t M, const float* wp, const float* bp, float* op, int64_t K, int64_t N) {
  at::parallel_for(0, row_linear_tasks(N), 1, [&](int64_t begin, int64_t end) {
    row_linear_run(xp, M, wp, bp, op, K, N, begin, end);
  });
}

}  // namespace lightvlm

namespace {

at::Tensor row_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "row_linear: float32 only");
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1) && x.numel() > 0,
              "row_linear: shapes");
  const int64_t K = weight.size(1), N = weight.size(0);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const int64_t M = xc.numel() / K;
  at::Tensor bc;
  if (bias.has_value()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.scalar_type() == at::kFloat && bc.numel() == N, "row_linear: bias");
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* bp = bias.has_value() ? bc.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  lightvlm::row_linear_into(xp, M, wp, bp, op, K, N);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lightvlm, CPU, m) { m.impl("row_linear", row_linear); }
