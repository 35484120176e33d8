// lightvlm::prefill_attention on CPU (AVX-512, float32): softmax(scale * q k^T) v for a prefill, causal
// (the LLM's layers, grouped-query heads) or bidirectional (vision towers). Registered for the schema
// defined in lightvlm_core/cpu_attention.py; lightvlm_core/cpu_kernels.py builds this file on first
// use (with OpenMP: at::parallel_for spreads the tasks over the threads).
//
// Per (batch, head, block of BQ query rows) the block's whole score rows are formed at once (prompts
// of up to a few thousand tokens: no online softmax needed): Q K^T by an 8-row x 32-key register
// tile over keys packed 32 at a time (K^T tiles, once per batch row and KV head), a softmax per row
// in base 2 with a polynomial exp (AVX-512 scalef), then P V by a (4-row x 64-dim) register tile
// over 32 KB chunks of V. Causal: a block reads only the keys up to its last row.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

constexpr int64_t KT = 32;  // keys per packed tile
constexpr int64_t BQ = 32;  // query rows per task

// s[r][0:32] = sum_d q[r][d] * ktile[d][0:32], 8 rows
template <int64_t D>
static inline void qk8(const float* q, const float* ktile, float* s, int64_t lds, float scale) {
  __m512 a[8][2];
  for (int r = 0; r < 8; ++r) { a[r][0] = _mm512_setzero_ps(); a[r][1] = _mm512_setzero_ps(); }
  for (int64_t d = 0; d < D; ++d) {
    const __m512 k0 = _mm512_loadu_ps(ktile + d * KT), k1 = _mm512_loadu_ps(ktile + d * KT + 16);
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r * D + d]);
      a[r][0] = _mm512_fmadd_ps(qb, k0, a[r][0]);
      a[r][1] = _mm512_fmadd_ps(qb, k1, a[r][1]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < 8; ++r) {
    _mm512_storeu_ps(s + r * lds, _mm512_mul_ps(a[r][0], sc));
    _mm512_storeu_ps(s + r * lds + 16, _mm512_mul_ps(a[r][1], sc));
  }
}

// o[r][0:D] (+)= sum_{j in [j0, j1)} p[r][j] * v[j][0:D], RT rows, D/16 vectors each
template <int64_t D, int RT>
static inline void pv(const float* p, int64_t ldp, const float* v, int64_t j0, int64_t j1, float* o, bool first) {
  constexpr int NV = D / 16;
  __m512 a[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < NV; ++c) a[r][c] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(o + r * D + c * 16);
  for (int64_t j = j0; j < j1; ++j) {
    __m512 vv[NV];
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(v + j * D + c * 16);
#pragma GCC unroll 8
    for (int r = 0; r < RT; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r * ldp + j]);
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) a[r][c] = _mm512_fmadd_ps(pb, vv[c], a[r][c]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * D + c * 16, a[r][c]);
}

// 2^x for x <= 0 as 2^n * p(f), n = round(x), f in [-0.5, 0.5]: a degree-5 polynomial fitted to 2^f
// (relative error 1.5e-7) and AVX-512's scalef for 2^n; x is clamped at -120 (a weight below 1e-36).
static inline __m512 exp2_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-120.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.0013276431f), f, _mm512_set1_ps(0.009675541f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.055507135f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402212f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314694f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001f));
  return _mm512_scalef_ps(p, n);
}

// One score row (base-2 logits) in place: 2^(s - max) over its first `valid` entries, zeros up to
// `npad`; returns 1 / sum. The partial last vector is read masked, so no scalar tail.
static inline float softmax_row(float* row, int64_t valid, int64_t npad) {
  const int64_t full = valid & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (valid - full)) - 1);
  const __m512 lowest = _mm512_set1_ps(-INFINITY);
  __m512 m0 = lowest, m1 = _mm512_mask_loadu_ps(lowest, tail, row + full);
  int64_t j = 0;
  for (; j + 32 <= full; j += 32) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(row + j));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(row + j + 16));
  }
  if (j < full) m0 = _mm512_max_ps(m0, _mm512_loadu_ps(row + j));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(m0, m1)));
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  for (j = 0; j + 32 <= full; j += 32) {
    const __m512 e0 = exp2_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + j), mx));
    const __m512 e1 = exp2_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + j + 16), mx));
    _mm512_storeu_ps(row + j, e0);
    _mm512_storeu_ps(row + j + 16, e1);
    s0 = _mm512_add_ps(s0, e0);
    s1 = _mm512_add_ps(s1, e1);
  }
  if (j < full) {
    const __m512 e = exp2_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + j), mx));
    _mm512_storeu_ps(row + j, e);
    s0 = _mm512_add_ps(s0, e);
  }
  if (full < npad) {  // the partial vector, zero past `valid`
    const __m512 e = _mm512_maskz_mov_ps(tail, exp2_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + full), mx)));
    _mm512_storeu_ps(row + full, e);
    s1 = _mm512_add_ps(s1, e);
    std::fill(row + full + 16, row + npad, 0.f);
  }
  return 1.f / _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

template <int64_t D>
static at::Tensor run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale) {
  constexpr int RT = D >= 128 ? 2 : (D >= 64 ? 4 : 8);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Hkv = k.size(1), S = k.size(2), G = H / Hkv;
  const int64_t ntiles = (S + KT - 1) / KT, Spad = ntiles * KT;
  auto out = at::empty_like(q);
  auto kt = at::empty({B, Hkv, ntiles, D, KT}, q.options());
  const float* kp = k.data_ptr<float>(); float* ktp = kt.data_ptr<float>();
  at::parallel_for(0, B * Hkv * ntiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i % ntiles, bh = i / ntiles;
      const float* src = kp + bh * S * D;
      float* dst = ktp + i * D * KT;
      for (int64_t c = 0; c < KT; ++c) {
        const int64_t j = t * KT + c;
        for (int64_t d = 0; d < D; ++d) dst[d * KT + c] = j < S ? src[j * D + d] : 0.f;
      }
    }
  });
  const float* qp = q.data_ptr<float>(); const float* vp = v.data_ptr<float>(); float* op = out.data_ptr<float>();
  const int64_t nblocks = (T + BQ - 1) / BQ, offset = S - T;
  const float fscale = static_cast<float>(scale * M_LOG2E);  // base-2 logits: softmax by 2^x
  at::parallel_for(0, B * H * nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> pbuf(BQ * Spad), qbuf(BQ * D), obuf(BQ * D), inv(BQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task % nblocks, h = (task / nblocks) % H, b = task / (nblocks * H);
      const int64_t r0 = blk * BQ, rows = std::min(BQ, T - r0);
      const int64_t n = causal ? std::min(S, r0 + rows + offset) : S;
      const int64_t nt = (n + KT - 1) / KT, npad = nt * KT;
      const float* Q = qp + ((b * H + h) * T + r0) * D;
      std::copy(Q, Q + rows * D, qbuf.data());
      std::fill(qbuf.data() + rows * D, qbuf.data() + BQ * D, 0.f);
      const float* Kt = ktp + (b * Hkv + h / G) * ntiles * D * KT;
      const float* V = vp + (b * Hkv + h / G) * S * D;
      float* P = pbuf.data();
      for (int64_t t = 0; t < nt; ++t)  // a key tile stays in L1 for every row group
        for (int64_t r = 0; r < BQ; r += 8)
          qk8<D>(qbuf.data() + r * D, Kt + t * D * KT, P + r * npad + t * KT, npad, fscale);
      for (int64_t r = 0; r < rows; ++r)
        inv[r] = softmax_row(P + r * npad, causal ? std::min(n, r0 + r + 1 + offset) : n, npad);
      for (int64_t r = rows; r < BQ; ++r) { std::fill(P + r * npad, P + (r + 1) * npad, 0.f); inv[r] = 0.f; }
      constexpr int64_t JC = 8192 / D;  // keys per chunk: 32 KB of values stay in L1 for every row group
      for (int64_t j0 = 0; j0 < n; j0 += JC)
        for (int64_t r = 0; r < BQ; r += RT)
          pv<D, RT>(P + r * npad, npad, V, j0, std::min(n, j0 + JC), obuf.data() + r * D, j0 == 0);
      float* O = op + ((b * H + h) * T + r0) * D;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < D; ++d) O[r * D + d] = obuf[r * D + d] * inv[r];
    }
  });
  return out;
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                             bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, H, T, D)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "float32 only");
  TORCH_CHECK(q.size(1) % k.size(1) == 0 && k.sizes() == v.sizes() && q.size(2) == k.size(2), "shape mismatch");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  switch (q.size(3)) {
    case 32: return run<32>(qc, kc, vc, causal, scale);
    case 64: return run<64>(qc, kc, vc, causal, scale);
    case 128: return run<128>(qc, kc, vc, causal, scale);
    default: TORCH_CHECK(false, "head_dim ", q.size(3), " not supported (32, 64, 128)");
  }
}

TORCH_LIBRARY_IMPL(lightvlm, CPU, m) { m.impl("prefill_attention", prefill_attention); }
