"""model/prefill_attention.py: a prompt chunk continuing a cached sequence attends to its past and
its own keys apart, merged by log-sum-exp; it must equal one masked softmax over the whole
context, on global layers and on chunked layers where the new tokens cross a chunk boundary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maverick_ray.model.attention import attention_mask
from maverick_ray.model.prefill_attention import continued_prefill

H, KV, D = 8, 2, 16


def reference(q, k_all, v_all, start, chunk):
    """Masked SDPA of the new queries over every key 0..start+n-1 (n new)."""
    n = q.shape[0]
    q_pos, k_pos = torch.arange(start, start + n), torch.arange(start + n)
    mask = attention_mask(q_pos, k_pos, chunk)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k_all.transpose(0, 1)[None],
                                         v_all.transpose(0, 1)[None], attn_mask=mask[None, None], enable_gqa=True)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("start, n, chunk", [(40, 1, None), (40, 17, None), (5, 3, None), (30, 12, 32),
                                             (28, 40, 32), (32, 7, 32), (64, 70, 32), (33, 1, 32)],
                         ids=["global-1", "global-17", "global-short", "chunked-inside", "chunked-crosses",
                              "chunked-starts-a-chunk", "chunked-crosses-two", "chunked-1"])
def test_continued_prefill_equals_one_masked_softmax_over_the_context(start, n, chunk):
    g = torch.Generator().manual_seed(start * 100 + n)
    q = torch.randn(n, H, D, generator=g)
    k_all, v_all = torch.randn(start + n, KV, D, generator=g), torch.randn(start + n, KV, D, generator=g)
    calls = []

    def past_kv(lo, hi):
        calls.append((lo, hi))
        return k_all[lo:hi][None], v_all[lo:hi][None]

    got = continued_prefill(q, k_all[start:], v_all[start:], start, chunk, past_kv)
    torch.testing.assert_close(got, reference(q, k_all, v_all, start, chunk), atol=2e-5, rtol=1e-4)
    lo = (start // chunk) * chunk if chunk else 0
    assert calls == ([(lo, start)] if lo < start else [])   # only the visible cached keys are read
