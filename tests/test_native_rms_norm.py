"""The native RMSNorm kernel (maverick_ray/native/rms_norm.c): torch's results to fp32 rounding,
used by RMSNorm only in fp32 inference, refusing inputs it cannot take."""

from __future__ import annotations

import pytest
import torch

from maverick_ray.model.norm import RMSNorm
from maverick_ray.native.rms_norm import rms_norm_kernel


@pytest.fixture(scope="module")
def kernel():
    k = rms_norm_kernel()
    assert k is not None, "the kernel must build on the development and CI machines (gcc is installed)"
    return k


def torch_norm(width, seed=0):
    torch.manual_seed(seed)
    norm = RMSNorm(width, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.1 * torch.randn(width))
    return norm


@pytest.mark.parametrize("shape", [
    (32, 512),      # a mini decode step
    (1024, 512),    # a prefill: rows split across threads
    (3, 5, 40),     # leading dims flattened
    (7, 37),        # width not a multiple of the vector length
    (0, 64),        # a rank with no tokens this step
])
def test_kernel_matches_torch_rmsnorm(kernel, shape):
    norm = torch_norm(shape[-1])
    x = 3 * torch.randn(shape)
    with torch.no_grad():
        want = norm(x)
        got = kernel(x, norm.weight, norm.eps)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


def test_noncontiguous_input_is_normalized_by_rows(kernel):
    norm = torch_norm(16)
    x = torch.randn(16, 8).t()  # (8, 16) view, rows not contiguous
    with torch.no_grad():
        torch.testing.assert_close(kernel(x, norm.weight, norm.eps), norm(x.contiguous()), rtol=2e-6, atol=2e-6)


def test_rmsnorm_uses_the_kernel_only_for_fp32_inference(kernel, monkeypatch):
    norm = torch_norm(64)
    calls = []
    plain = type(kernel).__call__
    monkeypatch.setattr(type(kernel), "__call__", lambda self, *a: calls.append(1) or plain(self, *a))
    assert norm.use_kernel(kernel)
    x = torch.randn(4, 64)
    with torch.no_grad():
        norm(x)
        norm(x.to(torch.bfloat16))  # other dtypes: torch
    assert calls == [1]
    x.requires_grad_(True)
    norm(x).sum().backward()  # autograd: torch
    assert calls == [1] and x.grad is not None
    assert not norm.use_kernel(None) and norm.kernel is None


def test_kernel_refuses_inputs_it_cannot_take(kernel):
    w = torch.ones(8)
    for x in (torch.randn(2, 9), torch.randn(2, 8, dtype=torch.float64)):
        with pytest.raises(ValueError, match="rms_norm kernel needs"):
            kernel(x, w, 1e-5)
    assert not kernel.supports(torch.ones(8, dtype=torch.float64)) and not kernel.supports(torch.ones(2, 4))
