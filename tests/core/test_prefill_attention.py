"""Prefill runs plain causal SDPA where no explicit mask is needed (lightvlm_core/forward.py): that
is exact only because rows are right-padded with their tokens in position order. Pin the property
it relies on: on every real token, causal SDPA is bitwise the explicit causal-and-valid mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "heads", "kv_heads", "tokens", "pad"),
                         [(1, 4, 2, 265, 0), (4, 4, 2, 265, 30), (3, 8, 2, 57, 50), (2, 4, 4, 33, 1)])
def test_causal_sdpa_is_bitwise_the_padded_mask_on_real_tokens(dtype, batch, heads, kv_heads, tokens, pad) -> None:
    torch.manual_seed(tokens)
    q = torch.randn(batch, heads, tokens, 64, dtype=dtype)
    k = torch.randn(batch, kv_heads, tokens, 64, dtype=dtype)
    v = torch.randn(batch, kv_heads, tokens, 64, dtype=dtype)
    valid = torch.ones(batch, tokens, dtype=torch.bool)
    valid[1:, tokens - pad:] = False  # every row but the first is right-padded
    mask = (torch.ones(tokens, tokens, dtype=torch.bool).tril()[None] & valid[:, None, :])[:, None]
    explicit = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
    real = valid[:, None, :, None].expand_as(explicit)
    assert torch.equal(explicit[real], causal[real])
    assert torch.isfinite(causal).all()  # padded queries see real keys too: no NaN to spread
