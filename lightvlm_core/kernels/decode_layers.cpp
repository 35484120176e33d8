// lightvlm::decode_layers on CPU (float32): every decoder layer of a Llama-style model for one new
// token per row, and the final norm, in one call (schema and where it is used: lightvlm_core/fused_decode.py).
//
// Why: at decode-size batches the compiled step (compiled_decode.py) is its kernels plus ~9 calls
// per layer from inductor's Python wrapper (four of its fused loops, four row linears, the
// attention), each a few microseconds of Python and dispatch, and a pre-graph pass fetching ~500
// parameters: ~1 ms of a 5 ms step on the 32-layer LLM-heavy model at batch 8. Here the layers run
// from C++ with the same kernels (row_linear.cpp, decode_attention.cpp; beyond the row kernel's
// rows, oneDNN's matmul); the elementwise work between them (RMSNorm, RoPE, SiLU-gate, residual
// adds) is a few thousand floats per row. Steps the row kernel takes run all layers in one OpenMP
// region (see decode_layers below).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "decode_attention.h"
#include "row_linear.h"

namespace {

using Vec = at::vec::Vectorized<float>;

// out[r] = x[r] * (1 / sqrt(mean(x[r]^2) + eps)) * w, as F.rms_norm
void rms_norm(const float* x, const float* w, float* out, int64_t rows, int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* o = out + r * d;
    Vec acc(0.f);
    int64_t i = 0;
    for (; i + Vec::size() <= d; i += Vec::size()) {
      const Vec v = Vec::loadu(xr + i);
      acc = at::vec::fmadd(v, v, acc);
    }
    float sum = _mm512_reduce_add_ps(acc);
    for (; i < d; ++i) sum += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(d) + eps);
    for (i = 0; i + Vec::size() <= d; i += Vec::size())
      ((Vec::loadu(xr + i) * Vec(inv)) * Vec::loadu(w + i)).store(o + i);
    for (; i < d; ++i) o[i] = (xr[i] * inv) * w[i];
  }
}

// dst[0:D] = src * cos + rotate_half(src) * sin, with signed_sin = (-sin[:D/2], sin[D/2:])
inline void rope(const float* src, const float* cos, const float* signed_sin, float* dst, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t j = 0; j < half; ++j) dst[j] = src[j] * cos[j] + src[j + half] * signed_sin[j];
  for (int64_t j = half; j < D; ++j) dst[j] = src[j] * cos[j] + src[j - half] * signed_sin[j];
}

// out[r][i] = silu(gate_up[r][i]) * gate_up[r][I + i], SiLU as ATen's x / (1 + exp(-x))
void silu_gate(const float* gate_up, float* out, int64_t rows, int64_t I) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * I;
    const float* u = g + I;
    float* o = out + r * I;
    int64_t i = 0;
    for (; i + Vec::size() <= I; i += Vec::size()) {
      const Vec x = Vec::loadu(g + i);
      ((x / (Vec(1.f) + x.neg().exp())) * Vec::loadu(u + i)).store(o + i);
    }
    for (; i < I; ++i) o[i] = (g[i] / (1.f + std::exp(-g[i]))) * u[i];
  }
}

void add_into(float* h, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] += x[i];
}

const float* dense(const at::Tensor& t, int64_t numel, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == numel, "decode_layers: ", what);
  return t.data_ptr<float>();
}

// x (B, K) W^T (+ bias) for steps of more rows than the row kernel takes: oneDNN's matmul
// (mkldnn::_linear_pointwise, as the compiled step's OneDnnLinear) where `onednn`, else ATen's
at::Tensor matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, bool onednn) {
  const std::optional<at::Tensor> b = bias != nullptr ? std::optional<at::Tensor>(*bias) : std::nullopt;
  if (!onednn) return at::linear(x, w, b);
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, w, b, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                                 std::optional<std::string>("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// q and k (RoPE'd; Qwen3-style layers: each head RMS-normed first) and v of every row, from the
// fused projection's output
void attention_inputs(const float* qkvp, int64_t B, int64_t H, int64_t kvh, int64_t D, const float* qn,
                      const float* kn, const float* cp, const float* sp, float* qp, float* kp, float* vp, float eps,
                      float* head_buf) {
  const int64_t n_qkv = (H + 2 * kvh) * D;
  for (int64_t b = 0; b < B; ++b) {
    const float* row = qkvp + b * n_qkv;
    for (int64_t head = 0; head < H + kvh; ++head) {
      const float* src = row + head * D;
      const float* norm = head < H ? qn : kn;
      if (norm != nullptr) {
        rms_norm(src, norm, head_buf, 1, D, eps);
        src = head_buf;
      }
      float* dst = head < H ? qp + (b * H + head) * D : kp + (b * kvh + head - H) * D;
      rope(src, cp + b * D, sp + b * D, dst, D);
    }
    std::memcpy(vp + b * kvh * D, row + (H + kvh) * D, kvh * D * sizeof(float));
  }
}

// thread `tid`'s share of `count` tasks, split as at::parallel_for splits them (so each output is
// computed as row_linear_into computes it)
inline std::pair<int64_t, int64_t> share(int64_t count, int tid, int threads) {
  const int64_t used = std::min<int64_t>(threads, count);
  const int64_t chunk = used > 0 ? (count + used - 1) / used : 0;
  const int64_t begin = std::min(count, tid * chunk);
  return {begin, std::min(count, begin + chunk)};
}

// One layer's weights as the loops read them.
struct LayerWeights {
  const float *input_norm, *qkv, *qkv_bias, *q_norm, *k_norm, *o, *post_norm, *gate_up, *down;
  int64_t I;  // MLP width
};

at::Tensor decode_layers(const at::Tensor& h_in, at::TensorList input_norms, at::TensorList qkv_weights,
                         at::TensorList qkv_biases, at::TensorList q_norms, at::TensorList k_norms,
                         at::TensorList o_weights, at::TensorList post_norms,
                         at::TensorList gate_up_weights, at::TensorList down_weights,
                         at::TensorList matmul_weights, const at::Tensor& cos,
                         const at::Tensor& signed_sin, at::TensorList keys, at::TensorList values,
                         at::Tensor lengths, const at::Tensor& rows, const at::Tensor& masks, const at::Tensor& plan,
                         at::TensorList scores, const at::Tensor& score_rows, const at::Tensor& final_norm,
                         double eps, double scale, int64_t num_heads, int64_t row_rows, bool onednn) {
  const int64_t L = static_cast<int64_t>(input_norms.size());
  TORCH_CHECK(h_in.dim() == 2 && h_in.scalar_type() == at::kFloat, "decode_layers: h is (B, d) float32");
  TORCH_CHECK(qkv_weights.size() == L && o_weights.size() == L && post_norms.size() == L &&
                  gate_up_weights.size() == L && down_weights.size() == L && keys.size() == L && values.size() == L &&
                  scores.size() == L && (qkv_biases.empty() || qkv_biases.size() == L) &&
                  q_norms.size() == k_norms.size() && (q_norms.empty() || q_norms.size() == L) &&
                  (matmul_weights.empty() || (onednn && matmul_weights.size() == 4 * L)),
              "decode_layers: one of each per layer");
  const int64_t B = h_in.size(0), d = h_in.size(1), H = num_heads;
  TORCH_CHECK(B > 0 && L > 0 && keys[0].dim() == 4, "decode_layers: shapes");
  const int64_t kvh = keys[0].size(1), D = keys[0].size(3), n_qkv = (H + 2 * kvh) * D;
  TORCH_CHECK(D % 2 == 0 && cos.numel() == B * D && signed_sin.numel() == B * D, "decode_layers: rope tables");
  const at::Tensor cosc = cos.contiguous(), sinc = signed_sin.contiguous();
  const float* cp = cosc.data_ptr<float>();
  const float* sp = sinc.data_ptr<float>();
  at::Tensor h = h_in.contiguous().clone();
  float* hp = h.data_ptr<float>();
  const at::TensorOptions options = h.options();
  at::Tensor x = at::empty({B, d}, options);
  at::Tensor q = at::empty({B, H, 1, D}, options), k = at::empty({B, kvh, D}, options);
  at::Tensor v = at::empty({B, kvh, D}, options), attended = at::empty({B, H, 1, D}, options);
  float* xp = x.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  std::vector<float> head_buf(D);
  const float feps = static_cast<float>(eps);
  std::vector<LayerWeights> layers;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t I = gate_up_weights[i].size(0) / 2;
    TORCH_CHECK(gate_up_weights[i].size(1) == d && down_weights[i].size(1) == I, "decode_layers: MLP shapes");
    const at::Tensor* bias = qkv_biases.empty() ? nullptr : &qkv_biases[i];
    layers.push_back({dense(input_norms[i], d, "input norm"), dense(qkv_weights[i], n_qkv * d, "qkv weight"),
                      bias != nullptr ? dense(*bias, n_qkv, "qkv bias") : nullptr,
                      q_norms.empty() ? nullptr : dense(q_norms[i], D, "q norm"),
                      k_norms.empty() ? nullptr : dense(k_norms[i], D, "k norm"),
                      dense(o_weights[i], d * H * D, "o weight"),
                      dense(post_norms[i], d, "post norm"), dense(gate_up_weights[i], 2 * I * d, "gate/up weight"),
                      dense(down_weights[i], d * I, "down weight"), I});
  }
  const float* final_w = dense(final_norm, d, "final norm");
  if (B <= row_rows) {
    // Few rows: every layer in one OpenMP region, the row kernel's and the attention's tasks split
    // over its threads as at::parallel_for splits them, barriers between the steps and the small
    // loops on thread 0. A region per linear (~160 a step) cost its fork and join each: on the 2-vCPU
    // VM 0.1 ms of a 2.9 ms `cpu-small` step at batch 1 and 0.2 of 2.3 when its memory ran fast.
    std::vector<lightvlm::DecodeAttention> attention;
    for (int64_t i = 0; i < L; ++i)  // checked here: nothing in the region may throw
      attention.push_back(lightvlm::prepare_decode_attention(q, k, v, keys[i], values[i], lengths, rows, plan,
                                                             scores[i], score_rows, i, scale, attended));
    int64_t widest = 0;
    for (const LayerWeights& w : layers) widest = std::max(widest, w.I);
    at::Tensor qkv = at::empty({B, n_qkv}, options), tmp = at::empty({B, d}, options);
    at::Tensor gate_up = at::empty({B, 2 * widest}, options), act = at::empty({B, widest}, options);
    float *gp = gate_up.data_ptr<float>(), *ap = act.data_ptr<float>(), *tp = tmp.data_ptr<float>();
    float *qkvp = qkv.data_ptr<float>(), *op = attended.data_ptr<float>();
    const int threads = std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(threads)
    {
      const int tid = omp_get_thread_num(), team = omp_get_num_threads();
      for (int64_t i = 0; i < L; ++i) {
        const LayerWeights& w = layers[i];
        if (tid == 0) rms_norm(hp, w.input_norm, xp, B, d, feps);
#pragma omp barrier
        auto [a0, a1] = share(lightvlm::row_linear_tasks(n_qkv), tid, team);
        lightvlm::row_linear_run(xp, B, w.qkv, w.qkv_bias, qkvp, d, n_qkv, a0, a1);
#pragma omp barrier
        if (tid == 0)
          attention_inputs(qkvp, B, H, kvh, D, w.q_norm, w.k_norm, cp, sp, qp, kp, vp, feps, head_buf.data());
#pragma omp barrier
        auto [b0, b1] = share(attention[i].tasks(), tid, team);
        lightvlm::run_decode_attention(attention[i], b0, b1);
#pragma omp barrier
        auto [c0, c1] = share(lightvlm::row_linear_tasks(d), tid, team);
        lightvlm::row_linear_run(op, B, w.o, nullptr, tp, H * D, d, c0, c1);
#pragma omp barrier
        if (tid == 0) {
          lightvlm::finish_decode_attention(attention[i]);
          add_into(hp, tp, B * d);
          rms_norm(hp, w.post_norm, xp, B, d, feps);
        }
#pragma omp barrier
        auto [e0, e1] = share(lightvlm::row_linear_tasks(2 * w.I), tid, team);
        lightvlm::row_linear_run(xp, B, w.gate_up, nullptr, gp, d, 2 * w.I, e0, e1);
#pragma omp barrier
        if (tid == 0) silu_gate(gp, ap, B, w.I);
#pragma omp barrier
        auto [f0, f1] = share(lightvlm::row_linear_tasks(d), tid, team);
        lightvlm::row_linear_run(ap, B, w.down, nullptr, tp, w.I, d, f0, f1);
#pragma omp barrier
        if (tid == 0) add_into(hp, tp, B * d);  // the next layer's norm follows on this thread
      }
    }
    rms_norm(hp, final_w, xp, B, d, feps);
    return x;
  }
  // More rows: the same layers, a matmul per linear (oneDNN brings its own threads), by the
  // oneDNN-packed copies of the weights where given (q/k/v, o, gate/up, down of each layer)
  at::Tensor act;
  const bool packed = !matmul_weights.empty();
  for (int64_t i = 0; i < L; ++i) {
    const LayerWeights& w = layers[i];
    const at::Tensor& qkv_w = packed ? matmul_weights[4 * i] : qkv_weights[i];
    const at::Tensor& o_w = packed ? matmul_weights[4 * i + 1] : o_weights[i];
    const at::Tensor& gate_up_w = packed ? matmul_weights[4 * i + 2] : gate_up_weights[i];
    const at::Tensor& down_w = packed ? matmul_weights[4 * i + 3] : down_weights[i];
    if (act.numel() != B * w.I) act = at::empty({B, w.I}, options);
    // attention block
    rms_norm(hp, w.input_norm, xp, B, d, feps);
    const at::Tensor* bias = qkv_biases.empty() ? nullptr : &qkv_biases[i];
    const at::Tensor qkv_out = matmul(x, qkv_w, bias, onednn);
    attention_inputs(qkv_out.data_ptr<float>(), B, H, kvh, D, w.q_norm, w.k_norm, cp, sp, qp, kp, vp, feps,
                     head_buf.data());
    const at::Tensor out = lightvlm::cpu_decode_attention(q, k, v, keys[i], values[i], lengths, rows, masks, plan,
                                                          scores[i], score_rows, i, scale);
    add_into(hp, matmul(out.view({B, H * D}), o_w, nullptr, onednn).data_ptr<float>(), B * d);
    // MLP block
    rms_norm(hp, w.post_norm, xp, B, d, feps);
    silu_gate(matmul(x, gate_up_w, nullptr, onednn).data_ptr<float>(), act.data_ptr<float>(), B, w.I);
    add_into(hp, matmul(act, down_w, nullptr, onednn).data_ptr<float>(), B * d);
  }
  rms_norm(hp, final_w, xp, B, d, feps);
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(lightvlm, CPU, m) { m.impl("decode_layers", decode_layers); }
// oneDNN-packed weights (layout torch._mkldnn) among the arguments make the dispatcher look here
TORCH_LIBRARY_IMPL(lightvlm, MkldnnCPU, m) { m.impl("decode_layers", decode_layers); }
