// lightvlm::cpu_decode_attention (AVX-512, float32): one decode step's cache append and attention
// (and, where the step scores, the heavy-hitter score update) for one layer, the same arithmetic as
// lightvlm::decode_attention (lightvlm_core/compiled_decode.py, whose schema it shares), in one C++
// call instead of a Python function issuing ~15 ATen ops, its loops spread over the OpenMP threads.
//
// Per (batch row, KV head) task: write the new key and value at the row's length, then attend the
// query heads that share the KV head over the row's entries: the scores of all the group's heads in
// one pass over the keys (16 products of keys and heads reduced to one vector by a transpose-and-add
// tree; later keys and the values asked for on the way), a softmax with ATen's vectorised exp, and
// the weighted sum of values with the group's output rows in registers. One pass instead of one per
// query head: 0.84-0.91x the time of a 32-layer step's attention at 1 and 8 rows of 400-1000
// entries (8 query heads on 2 KV heads, head_dim 32; AMD EPYC VM, 2 threads, alternating in one
// process). The key mask of the Python op is always a prefix of each row (slot < length, see
// BatchedKVCache.reserve), so each row attends exactly its own entries and the mask is not read.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "decode_attention.h"
#include "sum16.h"

namespace {

using Vec = at::vec::Vectorized<float>;

// p[g * ps + j] = scale * q[g] . k[j] for the G query heads of a group and keys j < n, in one pass
// over the keys: tiles of T keys x G heads fill 16 accumulators, reduced together by sum16 (the
// heads used to read the keys once each). NV = head_dim / 16. While it reads a key it asks for
// the key 16 entries on and for the value of the same entry, which the weighted sum reads next.
template <int NV, int G>
void group_scores(const float* q, const float* k, int64_t ks, const float* v, int64_t vs, int64_t n, float scale,
                  float* p, int64_t ps) {
  constexpr int T = 16 / G;
  constexpr int64_t D = 16 * NV;
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t j = 0;
  for (; j + T <= n; j += T) {
    __m512 acc[16];  // lane g * T + t: head g, key j + t (T x G <= 16 used, the rest stay zero)
    for (int i = T * G; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int t = 0; t < T; ++t) {
      const float* row = k + (j + t) * ks;
      for (int c = 0; c < NV; ++c) {
        _mm_prefetch(reinterpret_cast<const char*>(v + (j + t) * vs + 16 * c), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(row + 16 * ks + 16 * c), _MM_HINT_T0);
      }
      __m512 kv[NV];
      for (int c = 0; c < NV; ++c) kv[c] = _mm512_loadu_ps(row + 16 * c);
      for (int g = 0; g < G; ++g) {
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q + g * D), kv[0]);
        for (int c = 1; c < NV; ++c) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + 16 * c), kv[c], a);
        acc[g * T + t] = a;
      }
    }
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, _mm512_mul_ps(sum16(acc), sc));
    for (int g = 0; g < G; ++g)
      for (int t = 0; t < T; ++t) p[g * ps + j + t] = lanes[g * T + t];
  }
  for (; j < n; ++j) {
    const float* row = k + j * ks;
    for (int g = 0; g < G; ++g) {
      __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q + g * D), _mm512_loadu_ps(row));
      for (int c = 1; c < NV; ++c)
        a = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + 16 * c), _mm512_loadu_ps(row + 16 * c), a);
      p[g * ps + j] = _mm512_reduce_add_ps(a) * scale;
    }
  }
}

// group_scores for any number of heads per group, 8 at a time
template <int NV>
void scores_of(const float* q, const float* k, int64_t ks, const float* v, int64_t vs, int64_t n, int64_t groups,
               float scale, float* p) {
  constexpr int64_t D = 16 * NV;
  for (int64_t g = 0; g < groups; g += 8) {
    const float* qg = q + g * D;
    float* pg = p + g * n;
    switch (std::min<int64_t>(8, groups - g)) {
      case 1: group_scores<NV, 1>(qg, k, ks, v, vs, n, scale, pg, n); break;
      case 2: group_scores<NV, 2>(qg, k, ks, v, vs, n, scale, pg, n); break;
      case 3: group_scores<NV, 3>(qg, k, ks, v, vs, n, scale, pg, n); break;
      case 4: group_scores<NV, 4>(qg, k, ks, v, vs, n, scale, pg, n); break;
      case 5: group_scores<NV, 5>(qg, k, ks, v, vs, n, scale, pg, n); break;
      case 6: group_scores<NV, 6>(qg, k, ks, v, vs, n, scale, pg, n); break;
      case 7: group_scores<NV, 7>(qg, k, ks, v, vs, n, scale, pg, n); break;
      default: group_scores<NV, 8>(qg, k, ks, v, vs, n, scale, pg, n); break;
    }
  }
}

// s[0:n] = exp(s - max s); returns the sum
float softmax_numerators(float* s, int64_t n) {
  __m512 vtop = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) vtop = _mm512_max_ps(vtop, _mm512_loadu_ps(s + j));
  float top = _mm512_reduce_max_ps(vtop);
  for (; j < n; ++j) top = std::max(top, s[j]);
  __m512 vsum = _mm512_setzero_ps();
  const Vec shift(top);
  for (j = 0; j + 16 <= n; j += 16) {
    const __m512 e = (Vec::loadu(s + j) - shift).exp_u20();
    _mm512_storeu_ps(s + j, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  float sum = _mm512_reduce_add_ps(vsum);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - top);
    sum += s[j];
  }
  return sum;
}

// out[g] = (sum_j p[g][j] v[j]) / total[g] for G query rows of one group; NV = head_dim / 16. Each
// sum is a chain of multiply-adds: with fewer than 8 chains (G x NV) a pass waits on their latency,
// so such blocks keep two sets of sums, over the even and the odd entries
template <int NV, int G>
void weighted_values(const float* p, int64_t ps, const float* v, int64_t vs, int64_t n, const float* total,
                     float* out, int64_t os) {
  constexpr int S = G * NV < 8 ? 2 : 1;
  __m512 acc[S][G][NV];
  for (int s = 0; s < S; ++s)
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < NV; ++c) acc[s][g][c] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + S <= n; j += S)
    for (int s = 0; s < S; ++s) {
      __m512 vv[NV];
      for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(v + (j + s) * vs + 16 * c);
      for (int g = 0; g < G; ++g) {
        const __m512 w = _mm512_set1_ps(p[g * ps + j + s]);
        for (int c = 0; c < NV; ++c) acc[s][g][c] = _mm512_fmadd_ps(w, vv[c], acc[s][g][c]);
      }
    }
  for (; j < n; ++j)
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * ps + j]);
      for (int c = 0; c < NV; ++c)
        acc[0][g][c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + j * vs + 16 * c), acc[0][g][c]);
    }
  for (int g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(1.f / total[g]);
    for (int c = 0; c < NV; ++c) {
      const __m512 sum = S == 2 ? _mm512_add_ps(acc[0][g][c], acc[S - 1][g][c]) : acc[0][g][c];
      _mm512_storeu_ps(out + g * os + 16 * c, _mm512_mul_ps(sum, inv));
    }
  }
}

// weighted_values for `count` (1..G) query rows
template <int NV, int G>
void values_block(int64_t count, const float* p, int64_t ps, const float* v, int64_t vs, int64_t n,
                  const float* total, float* out, int64_t os) {
  if constexpr (G > 1)
    if (count < G) return values_block<NV, G - 1>(count, p, ps, v, vs, n, total, out, os);
  weighted_values<NV, G>(p, ps, v, vs, n, total, out, os);
}

// the query rows of one group in blocks that keep (rows x NV) accumulators within 16 registers: one
// pass over the values per block (a group of fewer rows than a block is one pass, not one per row)
template <int NV>
void group_values(const float* p, int64_t ps, const float* v, int64_t vs, int64_t n, const float* total,
                  float* out, int64_t os, int64_t groups) {
  constexpr int B = std::max(1, 16 / NV);
  for (int64_t g = 0; g < groups; g += B)
    values_block<NV, B>(std::min<int64_t>(B, groups - g), p + g * ps, ps, v, vs, n, total + g, out + g * os, os);
}

// the group's attention over one row's n entries into out; with `scores`, each entry's probability
// summed over the group's query heads is added to scores[j]
template <int NV>
void attend(const float* q, const float* k, const float* v, int64_t ks, int64_t vs, int64_t n, int64_t groups,
            float scale, float* out, float* scores) {
  constexpr int64_t D = 16 * NV;
  std::vector<float> p(groups * n), total(groups);
  scores_of<NV>(q, k, ks, v, vs, n, groups, scale, p.data());
  for (int64_t g = 0; g < groups; ++g) total[g] = softmax_numerators(p.data() + g * n, n);
  group_values<NV>(p.data(), n, v, vs, n, total.data(), out, D, groups);
  if (scores != nullptr) {
    std::vector<float> received(n, 0.f);
    for (int64_t g = 0; g < groups; ++g) {
      const float inv = 1.f / total[g];
      for (int64_t j = 0; j < n; ++j) received[j] += p[g * n + j] * inv;
    }
    for (int64_t j = 0; j < n; ++j) scores[j] += received[j];
  }
}

}  // namespace

namespace lightvlm {

DecodeAttention prepare_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         at::Tensor keys, at::Tensor values, at::Tensor lengths,
                                         const at::Tensor& rows, const at::Tensor& plan, at::Tensor scores,
                                         const at::Tensor& score_rows, int64_t layer, double scale,
                                         at::Tensor out) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat,
              "cpu_decode_attention: float32 only");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && keys.dim() == 4 && values.dim() == 4, "cpu_decode_attention: shapes");
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1, "cpu_decode_attention: the cache's rows must be dense");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && rows.scalar_type() == at::kLong,
              "cpu_decode_attention: index types");
  DecodeAttention a;
  a.batch = q.size(0), a.heads = q.size(1), a.dim = q.size(3), a.kv_heads = keys.size(1);
  TORCH_CHECK(a.dim == 32 || a.dim == 64 || a.dim == 128, "cpu_decode_attention: head_dim 32, 64 or 128");
  TORCH_CHECK(a.heads % a.kv_heads == 0 && keys.size(3) == a.dim && k.size(0) == a.batch && rows.size(0) == a.batch,
              "cpu_decode_attention: head layout");
  a.groups = a.heads / a.kv_heads;
  TORCH_CHECK(plan.scalar_type() == at::kLong && plan.dim() == 2 && plan.size(0) == 3, "cpu_decode_attention: plan");
  // plan[2]: 0 the cache keeps no scores (`scores` is a spare), 1 it keeps them (new entries start at
  // 0), 2 and this step adds the rows' attention to them (compiled_decode.py: NOT_KEPT, KEPT, SCORING)
  const int64_t kept = plan.accessor<int64_t, 2>()[2][layer];
  a.scoring = kept == 2;
  a.held[0] = score_rows.to(at::kBool).contiguous();
  if (kept != 0)
    TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.dim() == 3 && scores.stride(2) == 1 &&
                    scores.size(0) >= a.batch && a.held[0].size(0) == a.batch,
                "cpu_decode_attention: scores");
  a.sp = kept != 0 ? scores.data_ptr<float>() : nullptr;
  a.ss0 = scores.dim() == 3 ? scores.stride(0) : 0, a.ss1 = scores.dim() == 3 ? scores.stride(1) : 0;
  a.srow = a.held[0].data_ptr<bool>();
  // contiguous inputs are used in place (the fused layers fill q, k and v after this call)
  a.held[1] = q.contiguous(), a.held[2] = k.contiguous(), a.held[3] = v.contiguous(), a.held[4] = rows.contiguous();
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == q.numel(),
              "cpu_decode_attention: output buffer");
  a.len = lengths.data_ptr<int64_t>() + layer * lengths.stride(0);
  a.ls = lengths.stride(1);
  a.row = a.held[4].data_ptr<int64_t>();
  for (int64_t b = 0; b < a.batch; ++b)
    TORCH_CHECK(a.len[b * a.ls] >= 0 && a.len[b * a.ls] < keys.size(2) && a.row[b] >= 0 && a.row[b] < keys.size(0),
                "cpu_decode_attention: no room");
  a.kb = keys.data_ptr<float>(), a.vb = values.data_ptr<float>();
  a.ks0 = keys.stride(0), a.ks1 = keys.stride(1), a.ks2 = keys.stride(2);
  a.vs0 = values.stride(0), a.vs1 = values.stride(1), a.vs2 = values.stride(2);
  a.qp = a.held[1].data_ptr<float>(), a.kn = a.held[2].data_ptr<float>(), a.vn = a.held[3].data_ptr<float>();
  a.op = out.data_ptr<float>();
  a.scale = static_cast<float>(scale);
  if (a.sp != nullptr)  // a new entry starts from no attention received
    for (int64_t b = 0; b < a.batch; ++b)
      for (int64_t h = 0; h < a.kv_heads; ++h) a.sp[a.row[b] * a.ss0 + h * a.ss1 + a.len[b * a.ls]] = 0.f;
  return a;
}

void run_decode_attention(const DecodeAttention& a, int64_t begin, int64_t end) {
  const int64_t dim = a.dim;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / a.kv_heads, h = task % a.kv_heads, pos = a.len[b * a.ls];
    // the new entry, in the buffer row `rows[b]` (as the Python op writes it)
    std::memcpy(a.kb + a.row[b] * a.ks0 + h * a.ks1 + pos * a.ks2, a.kn + (b * a.kv_heads + h) * dim,
                dim * sizeof(float));
    std::memcpy(a.vb + a.row[b] * a.vs0 + h * a.vs1 + pos * a.vs2, a.vn + (b * a.kv_heads + h) * dim,
                dim * sizeof(float));
    // queries of row b attend buffer row b (as SDPA over keys[:, :, :span] does), pos + 1 entries
    const float* qg = a.qp + (b * a.heads + h * a.groups) * dim;
    const float* kr = a.kb + b * a.ks0 + h * a.ks1;
    const float* vr = a.vb + b * a.vs0 + h * a.vs1;
    float* o = a.op + (b * a.heads + h * a.groups) * dim;
    float* sc = a.scoring && a.srow[b] ? a.sp + b * a.ss0 + h * a.ss1 : nullptr;
    if (dim == 32) attend<2>(qg, kr, vr, a.ks2, a.vs2, pos + 1, a.groups, a.scale, o, sc);
    else if (dim == 64) attend<4>(qg, kr, vr, a.ks2, a.vs2, pos + 1, a.groups, a.scale, o, sc);
    else attend<8>(qg, kr, vr, a.ks2, a.vs2, pos + 1, a.groups, a.scale, o, sc);
  }
}

void finish_decode_attention(const DecodeAttention& a) {
  for (int64_t b = 0; b < a.batch; ++b) a.len[b * a.ls] += 1;
}

at::Tensor cpu_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor keys,
                                at::Tensor values, at::Tensor lengths, const at::Tensor& rows,
                                const at::Tensor& masks, const at::Tensor& plan, at::Tensor scores,
                                const at::Tensor& score_rows, int64_t layer, double scale) {
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));  // (B, H, 1, D)
  const DecodeAttention a = prepare_decode_attention(q, k, v, keys, values, lengths, rows, plan, scores, score_rows,
                                                     layer, scale, out);
  at::parallel_for(0, a.tasks(), 1, [&](int64_t begin, int64_t end) { run_decode_attention(a, begin, end); });
  finish_decode_attention(a);
  return out;
}

}  // namespace lightvlm

TORCH_LIBRARY_IMPL(lightvlm, CPU, m) { m.impl("cpu_decode_attention", lightvlm::cpu_decode_attention); }
