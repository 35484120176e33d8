// lightvlm::diverse_topk (float32, CPU): LightVLM's greedy choice of the image tokens to keep
// (lightvlm_core/reduction/lightvlm.py, `diverse_topk`): `target` times, take the token of highest
// weight x novelty not taken yet, then lower every token's novelty to at most its distance to the
// one taken. The picks are sequential; in NumPy each costs ~5 array calls of ~1 us over the T tokens,
// here one pass of a few hundred floats (on the LLM-heavy model's `aggressive` prefill of 8 prompts
// the NumPy loop held ~4.5% of py-spy's samples; in C++ the LLM part of that prefill measured
// 0.96-0.98x the time, bundled and LLM-heavy, 1 and 8 prompts). Same float32 products and the same
// first-of-equals argmax as the NumPy loop: the same picks, ties included (tests/core/test_reduction.py).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <vector>

namespace {

at::Tensor diverse_topk(const at::Tensor& distinct, const at::Tensor& weight, int64_t target) {
  TORCH_CHECK(distinct.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "diverse_topk: float32 only");
  const int64_t T = weight.numel();
  TORCH_CHECK(weight.dim() == 1 && distinct.dim() == 2 && distinct.size(0) == T && distinct.size(1) == T,
              "diverse_topk: distinct (T, T) and weight (T,)");
  TORCH_CHECK(target >= 0 && target <= T, "diverse_topk: target out of range");
  const at::Tensor d = distinct.contiguous(), w = weight.contiguous();
  const float* dp = d.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  std::vector<float> novelty(T, 1.f);
  std::vector<char> taken(T, 0);
  at::Tensor out = at::empty({target}, at::kLong);
  int64_t* picks = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < target; ++i) {
    int64_t pick = -1;
    float best = 0.f;
    for (int64_t j = 0; j < T; ++j) {
      if (taken[j]) continue;
      const float gain = wp[j] * novelty[j];
      if (pick < 0 || gain > best) {
        best = gain;
        pick = j;
      }
    }
    taken[pick] = 1;
    picks[i] = pick;
    const float* row = dp + pick * T;
    for (int64_t j = 0; j < T; ++j) novelty[j] = std::min(novelty[j], row[j]);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lightvlm, CPU, m) { m.impl("diverse_topk", diverse_topk); }
