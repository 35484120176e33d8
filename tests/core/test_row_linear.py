"""The few-row linear kernel (kernels/row_linear.cpp, `lightvlm::row_linear`) equals `F.linear` on
every path it has: 1-8 rows and more (taken four at a time), widths that are and are not a multiple
of 16 (the masked last block), output counts that are and are not a multiple of its weight-row
tiles (the one-at-a-time tail), with and without a bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightvlm_core import cpu_linear  # noqa: F401  (defines the op's schema)
from lightvlm_core.cpu_kernels import kernels_built

pytestmark = pytest.mark.skipif(not kernels_built(), reason="needs an AVX-512 CPU and g++")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 11])
@pytest.mark.parametrize("width", [16, 256, 200, 37])
@pytest.mark.parametrize("outputs", [96, 50, 7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_row_linear_equals_f_linear(rows: int, width: int, outputs: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + width + outputs)
    x = torch.randn(rows, width, generator=gen)
    weight = torch.randn(outputs, width, generator=gen)
    bias = torch.randn(outputs, generator=gen) if with_bias else None
    got = torch.ops.lightvlm.row_linear(x, weight, bias)
    assert got.shape == (rows, outputs)
    torch.testing.assert_close(got, F.linear(x, weight, bias), atol=1e-4, rtol=1e-4)


def test_row_linear_keeps_leading_dims() -> None:
    x, weight = torch.randn(2, 1, 64), torch.randn(40, 64)
    torch.testing.assert_close(torch.ops.lightvlm.row_linear(x, weight, None), F.linear(x, weight),
                               atol=1e-4, rtol=1e-4)
