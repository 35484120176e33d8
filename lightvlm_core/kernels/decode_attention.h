// The decode step's cache append + attention of decode_attention.cpp, for other kernels of this
// extension (decode_layers.cpp). Arguments as lightvlm::cpu_decode_attention's schema.
#pragma once
#include <ATen/ATen.h>

namespace lightvlm {

at::Tensor cpu_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor keys,
                                at::Tensor values, at::Tensor lengths, const at::Tensor& rows,
                                const at::Tensor& masks, const at::Tensor& plan, at::Tensor scores,
                                const at::Tensor& score_rows, int64_t layer, double scale);

// The same in three parts, for callers that run the tasks (batch row x KV head) on threads of their
// own: prepare checks the arguments, resets the new entries' scores and records where everything is
// (q, k, v, the output: contiguous buffers used in place, which may be filled afterwards); run
// appends and attends tasks [begin, end) and throws nothing; finish advances the layer's lengths.
struct DecodeAttention {
  int64_t batch = 0, heads = 0, dim = 0, kv_heads = 0, groups = 0;
  float *kb = nullptr, *vb = nullptr;
  int64_t ks0 = 0, ks1 = 0, ks2 = 0, vs0 = 0, vs1 = 0, vs2 = 0;
  const float *qp = nullptr, *kn = nullptr, *vn = nullptr;
  float* op = nullptr;
  int64_t* len = nullptr;
  int64_t ls = 0;
  const int64_t* row = nullptr;
  float* sp = nullptr;
  int64_t ss0 = 0, ss1 = 0;
  const bool* srow = nullptr;
  bool scoring = false;
  float scale = 1.f;
  at::Tensor held[5];  // what the pointers point into where it had to be made (bool rows, contiguous copies)
  int64_t tasks() const { return batch * kv_heads; }
};

DecodeAttention prepare_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         at::Tensor keys, at::Tensor values, at::Tensor lengths,
                                         const at::Tensor& rows, const at::Tensor& plan, at::Tensor scores,
                                         const at::Tensor& score_rows, int64_t layer, double scale, at::Tensor out);
void run_decode_attention(const DecodeAttention& a, int64_t begin, int64_t end);
void finish_decode_attention(const DecodeAttention& a);

}  // namespace lightvlm
