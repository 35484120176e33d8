"""Per-request token choice: greedy, or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

import torch

from lightvlm_core.scheduler import TokenLogprobs
from lightvlm_core.types import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else torch.seed())
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
           ) -> list[int]:
    """logits: (B, V) float. One token per row; greedy rows share one argmax."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[row] = _sample_row(logits[row], p, gen)
    return tokens


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        drop[0] = False  # a top_p that underflows float32 must still keep the most likely token
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen))


def token_logprobs(logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]
                   ) -> list[TokenLogprobs | None]:
    """Log-probabilities of the sampled tokens under the model's distribution (before temperature,
    top-k and top-p, as OpenAI reports them), plus each row's `top_logprobs` most likely tokens.
    logits: (B, V). None for rows that did not ask."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    k = max(p.top_logprobs for p in params)
    top_values, top_ids = (logprobs.topk(k, dim=-1) if k else (None, None))
    out: list[TokenLogprobs | None] = []
    for row, p in enumerate(params):
        if not p.logprobs:
            out.append(None)
            continue
        top = []
        if p.top_logprobs:
            top = list(zip(top_ids[row, :p.top_logprobs].tolist(), top_values[row, :p.top_logprobs].tolist()))
        out.append(TokenLogprobs(chosen[row], top))
    return out
