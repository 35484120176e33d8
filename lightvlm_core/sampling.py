"""Per-request token choice: greedy, or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

import torch

from lightvlm_core.scheduler import TokenLogprobs
from lightvlm_core.types import SamplingParams

TOP_P_CANDIDATES = 1024  # tokens sorted for top-p before falling back to the whole vocabulary


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else torch.seed())
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
           ) -> list[int]:
    """logits: (B, V) float. One token per row: the greedy rows take one argmax together, the sampling
    rows are drawn together (temperature, top-k and top-p batched over the rows)."""
    drawn = [row for row, p in enumerate(params) if not p.greedy]
    if not drawn:
        return logits.argmax(dim=-1).tolist()
    if len(drawn) == len(params):
        return _sample_rows(logits, params, generators).tolist()
    greedy = [row for row, p in enumerate(params) if p.greedy]
    greedy_index, drawn_index = (torch.tensor(rows, device=logits.device) for rows in (greedy, drawn))
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    tokens[greedy_index] = logits.index_select(0, greedy_index).argmax(dim=-1)
    tokens[drawn_index] = _sample_rows(logits.index_select(0, drawn_index), [params[r] for r in drawn],
                                       [generators[r] for r in drawn])
    return tokens.tolist()


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
                 ) -> torch.Tensor:
    """Sampled token ids (B,) for rows that all sample, each from softmax(logits / T) restricted to its
    top-k and top-p set. Inverse-CDF sampling: the only per-row work is one uniform number from the
    row's own generator, so a seeded request samples the same tokens whatever else is in the batch.
    (torch.multinomial and exponential noise cost milliseconds per row at a 150k vocabulary.)"""
    device = logits.device
    temperatures = {p.temperature for p in params}
    if len(temperatures) == 1:  # the common case: one division by a number
        logits = logits / temperatures.pop()
    else:
        logits = logits / torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)[:, None]
    if any(p.top_k > 0 for p in params):
        logits = _keep_top_k(logits, [p.top_k for p in params])
    probs = logits.softmax(dim=-1)
    if any(p.top_p < 1.0 for p in params):
        probs = _keep_top_p(probs, [p.top_p for p in params])
    uniforms = torch.cat([torch.rand(1, generator=gen, device=device, dtype=probs.dtype) for gen in generators])
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1]
    if not bool(torch.isfinite(total).all()):  # fail the row (the runner pins it) rather than draw garbage
        raise ValueError("sampling: the model's probabilities are not finite (NaN or inf in the logits)")
    # strictly below the total (u * total can round up to it), so the first entry of the cumulative
    # sum above the target is always a token with probability mass
    target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target[:, None], right=True)[:, 0]


def _keep_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Mask (to -inf) every logit below its row's k-th largest; k = 0 keeps the row whole."""
    vocab = logits.shape[-1]
    ks = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k], device=logits.device)
    largest = torch.topk(logits, int(ks.max()), dim=-1).values
    kth = largest.gather(1, (ks - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def _keep_top_p(probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Zero every token outside its row's smallest most-likely prefix whose mass reaches top_p
    (always at least the most likely token); top_p = 1 keeps the row whole.

    The prefix is looked for among the TOP_P_CANDIDATES most likely tokens (a partial sort), and only
    where some row's nucleus is wider than that does the whole vocabulary get sorted."""
    limits = torch.tensor([p if p < 1.0 else float("inf") for p in top_p], dtype=probs.dtype, device=probs.device)
    whole = limits == float("inf")
    vocab = probs.shape[-1]
    sorted_probs, order = probs.topk(min(TOP_P_CANDIDATES, vocab), dim=-1)
    mass = sorted_probs.cumsum(dim=-1)
    if sorted_probs.shape[-1] < vocab and bool(((mass[:, -1] < limits) & ~whole).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass = sorted_probs.cumsum(dim=-1)
    keep = mass - sorted_probs < limits[:, None]
    keep[:, 0] = True  # a top_p that underflows float32 must still keep the most likely token
    kept = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, keep) | whole[:, None]
    return probs * kept


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
