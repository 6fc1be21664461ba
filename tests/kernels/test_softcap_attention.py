"""softcap_attention: SDPA's function with bounded scores (Gemma 2's chain, SDPA's conventions)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autosp.kernels.softcap_attention import softcap_attention


def _chain(q, k, v, mask, scale, cap):
    """Gemma 2's eager attention, as transformers writes it (KV already at the query heads; the
    softmax in float32, or float64 for float64 inputs as the op keeps them)."""
    w = torch.matmul(q, k.transpose(2, 3)) * scale
    w = torch.tanh(w / cap) * cap
    if mask is not None:
        w = w + mask
    return torch.matmul(F.softmax(w, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype), v)


def _qkv(heads=4, kv_heads=4, S=9, H=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, S, H, generator=g, dtype=dtype) * 2
    k, v = (torch.randn(2, kv_heads, S, H, generator=g, dtype=dtype) * 2 for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("mask_kind", ["causal", "bool", "float", "none"])
def test_softcap_attention_is_the_chain(mask_kind):
    q, k, v = _qkv()
    S = q.shape[-2]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    additive = torch.zeros(S, S, dtype=q.dtype).masked_fill(~causal, torch.finfo(q.dtype).min)
    cap, scale = 0.8, 0.3
    kwargs = {"causal": dict(is_causal=True), "bool": dict(attn_mask=causal), "float": dict(attn_mask=additive),
              "none": {}}[mask_kind]
    got = softcap_attention(q, k, v, scale=scale, softcap=cap, **kwargs)
    expect = _chain(q, k, v, None if mask_kind == "none" else additive, scale, cap)
    torch.testing.assert_close(got, expect)


def test_grouped_kv_and_the_default_scale():
    q, k, v = _qkv(heads=4, kv_heads=2)
    got = softcap_attention(q, k, v, is_causal=True, enable_gqa=True, softcap=1.5)
    rep = (t.repeat_interleave(2, dim=1) for t in (k, v))
    S = q.shape[-2]
    mask = torch.zeros(S, S, dtype=q.dtype).masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(got, _chain(q, *rep, mask, 8 ** -0.5, 1.5))


def test_a_large_cap_is_sdpa_and_the_gradients_flow():
    q, k, v = (t.requires_grad_() for t in _qkv())
    got = softcap_attention(q, k, v, is_causal=True, softcap=1e9)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    got.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_bad_arguments_are_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="dropout"):
        softcap_attention(q, k, v, dropout_p=0.1, softcap=1.0)
    with pytest.raises(ValueError, match="positive"):
        softcap_attention(q, k, v, softcap=0.0)
