"""attention_merge: merging two partial attentions equals attention over both key sets; the
Triton kernel equals the reference (on CPU under TRITON_INTERPRET=1, and on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from autosp.kernels import reference
from autosp.kernels.attention_merge import merge_attention


def _partial(q, k, v, causal_offset=None):
    """Attention of q over (k, v) with its natural log-sum-exp; rows with no key get lse=-inf, o=0."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal_offset is not None:  # key j visible to query i when j + causal_offset <= i
        i = torch.arange(q.shape[-2])[:, None]
        j = torch.arange(k.shape[-2])[None, :]
        scores = scores.masked_fill(j + causal_offset > i, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.where(torch.isinf(lse)[..., None], 0.0, torch.exp(scores - lse[..., None].nan_to_num(neginf=0.0)))
    return (p @ v.float()).to(q.dtype), lse


def test_merge_equals_attention_over_both_chunks_causal_with_empty_rows():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 37, 24, generator=g)
    k = torch.randn(2, 3, 37, 24, generator=g)
    v = torch.randn(2, 3, 37, 24, generator=g)
    full, full_lse = _partial(q, k, v, causal_offset=0)
    cut = 20  # keys [0, 20) and [20, 37): queries before 20 see none of the second chunk (lse -inf)
    o1, lse1 = _partial(q, k[..., :cut, :], v[..., :cut, :], causal_offset=0)
    o2, lse2 = _partial(q, k[..., cut:, :], v[..., cut:, :], causal_offset=cut)
    assert torch.isinf(lse2[..., :cut]).all()
    o, lse = merge_attention(o1, lse1, o2, lse2, use_triton=False)
    torch.testing.assert_close(o, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, full_lse, rtol=1e-5, atol=1e-5)


def test_both_parts_empty_gives_zero_and_minus_infinity():
    o = torch.randn(4, 8)
    lse = torch.full((4,), float("-inf"))
    out, out_lse = reference.merge_attention(o, lse, o, lse)
    assert torch.equal(out, torch.zeros_like(o)) and torch.isinf(out_lse).all() and not out.isnan().any()


def test_bad_inputs():
    o = torch.randn(2, 5, 8)
    lse = torch.randn(2, 5)
    with pytest.raises(ValueError, match="do not match"):
        merge_attention(o, lse, o[:, :4], lse[:, :4])
    with pytest.raises(ValueError, match="float32"):
        merge_attention(o, lse.double(), o, lse.double())


_INTERPRETED = textwrap.dedent("""
    import torch
    from autosp.kernels import reference
    from autosp.kernels.attention_merge import merge_attention
    g = torch.Generator().manual_seed(1)
    for dtype, shape, tol in ((torch.float32, (2, 3, 37, 24), 1e-6), (torch.bfloat16, (1, 2, 33, 64), 1e-2)):
        o1, o2 = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
        lse1, lse2 = (torch.randn(shape[:-1], generator=g) * 4 for _ in range(2))
        lse2[..., :5] = float("-inf")      # one part empty
        lse1[..., :2] = float("-inf")      # both parts empty
        got = merge_attention(o1, lse1, o2, lse2, use_triton=True)
        want = merge_attention(o1, lse1, o2, lse2, use_triton=False)
        torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    print("interpreted ok")
""")


def test_triton_kernel_matches_reference_interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0 and "interpreted ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.gpu
def test_triton_kernel_matches_reference_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(2)
    o1, o2 = (torch.randn(2, 8, 1000, 64, device="cuda", generator=g).bfloat16() for _ in range(2))
    lse1, lse2 = (torch.randn(2, 8, 1000, device="cuda", generator=g) for _ in range(2))
    got = merge_attention(o1, lse1, o2, lse2)
    want = merge_attention(o1, lse1, o2, lse2, use_triton=False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[1], want[1])
