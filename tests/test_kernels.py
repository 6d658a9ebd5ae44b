"""`kernels.linear` on CPUs without bf16 instructions: multi-row bf16 products go through fp32, row-sliced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from faasmoe.models import kernels


@pytest.fixture
def fp32_path(monkeypatch):
    monkeypatch.setenv("FAASMOE_BF16_GEMM", "fp32")
    kernels.native_half_gemm.cache_clear()
    yield
    kernels.native_half_gemm.cache_clear()


@pytest.mark.parametrize("rows", [1, 3, 4, 16])
def test_bf16_products_equal_an_fp32_product_rounded_whatever_the_slicing(fp32_path, monkeypatch, rows):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
    w = torch.randn(300, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(300, generator=g).to(torch.bfloat16)
    monkeypatch.setattr(kernels, "CHUNK", 64 * 7)  # 7 weight rows at a time: 43 slices, the last one short
    out = kernels.linear(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 300)
    if rows < kernels.MIN_ROWS:
        assert torch.equal(out, F.linear(x, w, b))
    else:
        ref = F.linear(x.float(), w.float(), b.float()).to(torch.bfloat16)
        assert torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_fp32_products_and_the_override_are_left_alone(fp32_path):
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    assert kernels.native_half_gemm() is False


def test_a_bad_override_says_what_is_allowed(monkeypatch):
    monkeypatch.setenv("FAASMOE_BF16_GEMM", "fast")
    kernels.native_half_gemm.cache_clear()
    try:
        with pytest.raises(ValueError, match="native or fp32"):
            kernels.native_half_gemm()
    finally:
        kernels.native_half_gemm.cache_clear()
