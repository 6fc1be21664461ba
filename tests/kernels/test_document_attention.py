"""document_attention: the op equals ``F.scaled_dot_product_attention`` with the document-causal
mask (outputs, lse and every gradient) for several document layouts; it runs under torch.compile
as opaque calls and passes ``torch.library.opcheck``; the Triton kernels equal the reference (on
CPU under TRITON_INTERPRET=1, and on a GPU). Legend: B batch, H heads, S sequence, D head dim.

Tolerances (atol = rtol), against the truth named in each row:

    what                        tol    why
    op (reference path), fp32   1e-5   float32 on both sides, the same sums in another order
      vs SDPA with the mask            (observed max abs error ~1e-6 on unit-variance inputs)
    kernels interpreted, fp32   1e-5   online (base-2) against two-pass softmax: a few float32
      vs the reference                 ulps (observed ~1e-6)
    kernels on CUDA, fp32       1e-4   full-precision products ("ieee", not tf32) in another order
      vs the reference
    kernels on CUDA, fp16       1e-2   fp16 rounding of P, dS and the results (2**-11 relative)
      vs the fp32 reference
    kernels on CUDA, bf16       GPU_TOLERANCES: the same bf16 inputs on both sides; the kernels round
      vs the fp32 reference     P and dS to bf16 before their products and o, dq, dk, dv at the end.
                                Observed on an H200 (S=4096, unit-variance inputs): max abs error
                                o 0.009, dq 0.017, dk 0.014, dv 0.022 for |values| up to 4-7, i.e.
                                about half a bf16 ulp of the largest values, the same as SDPA's own
                                bf16 kernel with the same mask. atol alone covers them (1.4x for
                                dv, 2-3x for the others); rtol adds its share of |value|
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from autosp.kernels import document_attention as da
from autosp.kernels.document_attention import (
    DOCUMENT_ATTENTION,
    document_attention,
    document_attention_lse,
    document_attention_reference,
)

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_TOL = 1e-5
GPU_TOLERANCES = {  # (atol, rtol) of the bf16 kernels against the float32 reference
    "o": (2e-2, 2e-2),
    "dq": (5e-2, 5e-2),
    "dk": (5e-2, 5e-2),
    "dv": (3e-2, 3e-2),
}

# Document lengths per row (each row sums to S); several rows = one row each of the batch.
LAYOUTS_50 = {
    "one_document": [[50], [50]],  # plain causal attention
    "unequal_with_singletons": [[1, 7, 1, 1, 20, 3, 17], [3, 1, 1, 45]],
    "rows_differ": [[13, 1, 36], [25, 25]],
    "all_singletons": [[1] * 50, [49, 1]],  # a document of one token attends to itself: o = v
}


def doc_ids(lengths_per_row: list[list[int]], dtype=torch.int64, device="cpu") -> torch.Tensor:
    """``[B, S]`` nondecreasing document ids (a cumsum of start flags) from each row's lengths."""
    rows = []
    for lengths in lengths_per_row:
        flags = torch.zeros(sum(lengths), dtype=dtype)
        flags[torch.tensor(lengths[:-1], dtype=torch.long).cumsum(0)] = 1
        rows.append(flags.cumsum(0))
    return torch.stack(rows).to(device)


def _inputs(b, heads, seq, dim, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, heads, seq, dim, generator=g).to(device=device, dtype=dtype) for _ in range(4))


def _truth(q, k, v, do, doc, scale=None, window=None):
    """SDPA with the dense document-causal mask (same dtype as the inputs): o, lse, dq, dk, dv."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    mask_B1SS = da.document_mask(doc, window, batch=q.shape[0], seq=q.shape[2])[:, None]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1SS, scale=scale)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    s = (q.detach().double() @ k.detach().double().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    lse = s.masked_fill(~mask_B1SS, float("-inf")).logsumexp(-1)
    return o.detach(), lse.float(), dq, dk, dv


def _run(q, k, v, do, doc, scale=None, use_triton=None, window=None, softcap=None):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o, lse = document_attention_lse(q, k, v, doc, scale, window, softcap, use_triton)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return o.detach(), lse, dq, dk, dv


def _assert_close(got, want, tol, names=("o", "lse", "dq", "dk", "dv")):
    for name, x, y in zip(names, got, want, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype, (name, x.shape, x.dtype, y.shape, y.dtype)
        torch.testing.assert_close(x, y, atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("layout", sorted(LAYOUTS_50))
def test_op_equals_masked_sdpa(layout):
    q, k, v, do = _inputs(2, 3, 50, 16, seed=len(layout))
    doc = doc_ids(LAYOUTS_50[layout])
    _assert_close(_run(q, k, v, do, doc), _truth(q, k, v, do, doc), CPU_TOL)


@pytest.mark.parametrize("window", [1, 4, 17, 50, 1000])
@pytest.mark.parametrize("layout", [None, "unequal_with_singletons", "rows_differ"])
def test_window_equals_masked_sdpa(layout, window):
    """A sliding window (transformers' ``sliding_window``: ``i - j < window``) with or without
    documents; 1: each query sees itself alone; 50 and 1000 (>= S): no window at all."""
    q, k, v, do = _inputs(2, 3, 50, 16, seed=window)
    doc = None if layout is None else doc_ids(LAYOUTS_50[layout])
    got = _run(q, k, v, do, doc, window=window)
    _assert_close(got, _truth(q, k, v, do, doc, window=window), CPU_TOL)
    if window >= 50:
        _assert_close(got, _run(q, k, v, do, doc), 0.0)
    if window == 1:
        torch.testing.assert_close(got[0], v, atol=CPU_TOL, rtol=CPU_TOL)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_kv_equals_repeated_kv(kv_heads):
    """k, v with H / G heads (query head h reads KV head h // G): the output and dq of the repeated
    call, dk and dv summed over each group; with documents and a window."""
    q, k_rep, v_rep, do = _inputs(2, 4, 50, 16, seed=kv_heads)
    group = 4 // kv_heads
    k, v = k_rep[:, ::group].contiguous(), v_rep[:, ::group].contiguous()
    k_rep, v_rep = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    doc = doc_ids(LAYOUTS_50["unequal_with_singletons"])
    o, lse, dq, dk, dv = _run(q, k, v, do, doc, window=9)
    want = _run(q, k_rep, v_rep, do, doc, window=9)
    assert dk.shape == k.shape and dv.shape == v.shape
    b, _, seq, dim = q.shape
    summed = [x.view(b, kv_heads, group, seq, dim).sum(2) for x in want[3:]]
    _assert_close((o, lse, dq, dk, dv), (*want[:3], *summed), CPU_TOL)
    _assert_close((o,), (_truth(q, k_rep, v_rep, do, doc, window=9)[0],), CPU_TOL, names=("o",))


def _softcap_truth(q, k, v, do, doc, softcap, scale=None, window=None):
    """``softcap_attention`` (Gemma 2's chain in torch ops, autograd's backward) with the dense
    document-causal mask: o, lse (of the bounded scores, float64), dq, dk, dv."""
    from autosp.kernels.softcap_attention import softcap_attention

    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    mask_B1SS = da.document_mask(doc, window, batch=q.shape[0], seq=q.shape[2])[:, None]
    o = softcap_attention(q, k, v, attn_mask=mask_B1SS, scale=scale, enable_gqa=True, softcap=softcap)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    group = q.shape[1] // k.shape[1]
    s = q.detach().double() @ k.detach().double().repeat_interleave(group, 1).transpose(-1, -2)
    s = torch.tanh(s * (q.shape[-1] ** -0.5 if scale is None else scale) / softcap) * softcap
    lse = s.masked_fill(~mask_B1SS, float("-inf")).logsumexp(-1)
    return o.detach(), lse.float(), dq, dk, dv


@pytest.mark.parametrize("layout,window,kv_heads", [(None, None, 4), ("unequal_with_singletons", None, 2),
                                                    ("rows_differ", 9, 1), (None, 17, 4)])
def test_softcap_equals_softcap_attention_with_the_mask(layout, window, kv_heads):
    """Scores bounded by ``c tanh(s / c)`` (Gemma 2): the op (reference path, its explicit backward)
    equals softcap_attention with the dense mask, grouped KV and a window included. The cap is
    small (0.7 against scores of about unit size at scale 0.5), so that tanh bends."""
    q, _, _, do = _inputs(2, 4, 50, 16, seed=kv_heads)
    _, k, v, _ = _inputs(2, kv_heads, 50, 16, seed=20 + kv_heads)
    doc = None if layout is None else doc_ids(LAYOUTS_50[layout])
    got = _run(q, k, v, do, doc, scale=0.5, window=window, softcap=0.7)
    _assert_close(got, _softcap_truth(q, k, v, do, doc, 0.7, scale=0.5, window=window), CPU_TOL)
    uncapped = _run(q, k, v, do, doc, scale=0.5, window=window)
    assert (got[0] - uncapped[0]).abs().max() > 0.05  # the bound changed the result
    assert (got[2] - uncapped[2]).abs().max() > 0.05


def test_softcap_far_above_the_scores_is_no_cap():
    q, k, v, do = _inputs(2, 3, 50, 16, seed=5)
    doc = doc_ids(LAYOUTS_50["rows_differ"])
    _assert_close(_run(q, k, v, do, doc, softcap=1e6), _run(q, k, v, do, doc), CPU_TOL)


def test_one_document_is_causal_attention_and_singletons_copy_v():
    q, k, v, _ = _inputs(2, 3, 50, 16, seed=1)
    one = document_attention(q, k, v, doc_ids(LAYOUTS_50["one_document"]))
    torch.testing.assert_close(one, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=CPU_TOL, rtol=CPU_TOL)
    single = document_attention(q, k, v, doc_ids([[1] * 50, [1] * 50]))
    torch.testing.assert_close(single, v, atol=CPU_TOL, rtol=CPU_TOL)


def test_strided_inputs_int32_ids_explicit_scale():
    """q, k, v as views of [B, S, H, D] (the model's layout), int32 ids, odd S and H."""
    g = torch.Generator().manual_seed(2)
    q, k, v, do = (torch.randn(2, 37, 5, 8, generator=g).transpose(1, 2) for _ in range(4))
    doc = doc_ids([[10, 1, 26], [37]], dtype=torch.int32)
    got = _run(q, k, v, do, doc, scale=0.3)
    assert not q.is_contiguous() and got[0].is_contiguous()
    _assert_close(got, _truth(q, k, v, do, doc, scale=0.3), CPU_TOL)


def test_plain_function_output_only_and_lse_not_differentiable():
    q, k, v, _ = _inputs(1, 2, 9, 16, dtype=torch.bfloat16)
    q.requires_grad_()
    doc = doc_ids([[4, 5]])
    o, lse = document_attention_lse(q, k, v, doc)
    assert o.requires_grad and not lse.requires_grad and o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.equal(document_attention(q, k, v, doc), o)
    assert torch.equal(document_attention_reference(q, k, v, doc)[0], o.detach())


def test_document_bounds():
    doc = torch.tensor([[0, 0, 0, 1, 2, 2], [5, 5, 5, 5, 5, 5]])
    start, end = da.document_bounds(doc)
    assert start.dtype == end.dtype == torch.int32
    assert start.tolist() == [[0, 0, 0, 3, 4, 4], [0] * 6]
    assert end.tolist() == [[2, 2, 2, 3, 5, 5], [5] * 6]


def test_document_bounds_with_a_window_and_without_documents():
    doc = torch.tensor([[0, 0, 0, 0, 0, 1, 1]])
    start, end = da.document_bounds(doc, 2)
    assert start.tolist() == [[0, 0, 1, 2, 3, 5, 5]] and end.tolist() == [[1, 2, 3, 4, 4, 6, 6]]
    start, end = da.document_bounds(None, 3, batch=2, seq=5)
    assert start.tolist() == [[0, 0, 0, 1, 2]] * 2 and end.tolist() == [[2, 3, 4, 4, 4]] * 2
    start, end = da.document_bounds(None, batch=1, seq=4)
    assert start.tolist() == [[0] * 4] and end.tolist() == [[3] * 4]


def test_torch_compile_aot_eager_keeps_both_ops_opaque():
    seen = {}

    def capture(name):
        def hook(gm, inputs):
            seen[name] = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
            return inputs
        return hook

    def backend(gm, inputs):
        from autosp import _torch_private as tp

        return tp.compile_partitioned(gm, inputs, "aot_eager", capture("fw"), capture("bw"))

    doc = doc_ids(LAYOUTS_50["unequal_with_singletons"])

    def f(q, k, v):
        return document_attention(q, k, v, doc) * 2

    q, k, v, _ = _inputs(2, 3, 50, 16, seed=3)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    compiled = torch.compile(f, backend=backend, fullgraph=True)(*inputs)
    grads = torch.autograd.grad(compiled.sum(), inputs)
    eager_inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    eager = f(*eager_inputs)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    for x, y in zip(grads, torch.autograd.grad(eager.sum(), eager_inputs), strict=True):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert "autosp.document_attention.default" in seen["fw"]
    assert "autosp.document_attention_backward.default" in seen["bw"]


def test_opcheck():
    q, k, v, do = _inputs(2, 2, 20, 16, seed=4)
    doc = doc_ids([[5, 1, 14], [20]])
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(DOCUMENT_ATTENTION, (q, k, v, doc, None, None, None))
    torch.library.opcheck(DOCUMENT_ATTENTION, (q, k, v, doc, 0.5, 3, None, False))
    torch.library.opcheck(DOCUMENT_ATTENTION, (q, k, v, doc, None, 3, 0.8, None))
    torch.library.opcheck(DOCUMENT_ATTENTION, (q, k, v, None, None, 4, None))
    torch.library.opcheck(DOCUMENT_ATTENTION, (q, k[:, :1], v[:, :1], doc, None, None, None))
    o, lse = document_attention_reference(q.detach(), k.detach(), v.detach(), doc)
    torch.library.opcheck(torch.ops.autosp.document_attention_backward.default,
                          (do, q.detach(), k.detach(), v.detach(), o, lse, doc, 0.25, None, None, None))


def test_offsets_inside_a_head_stay_in_int32():
    """A layout whose offsets inside one (b, h) slice pass 2**31 is copied to contiguous; a head
    too long even then is refused (meta tensors: nothing is allocated)."""
    ok = torch.empty(1, 2, 1 << 20, 64, device="meta")
    assert da._unit_d(ok) is ok
    wide = torch.empty_strided((1, 2, 1 << 20, 64), (0, 64, 4096, 1), device="meta")  # stride_s 4096: 2**32
    assert da._unit_d(wide).is_contiguous()
    with pytest.raises(ValueError, match="int32 offsets"):
        da._unit_d(torch.empty(1, 1, 1 << 25, 128, device="meta"))


def test_bad_inputs():
    q, k, v, _ = _inputs(1, 2, 8, 16)
    doc = doc_ids([[8]])
    cases = [
        ((q[0], k, v, doc), "must be \\[B, H, S, D\\]"),
        ((q, k[:, :, :7], v, doc), "must be \\[B, H, S, D\\]"),
        ((torch.cat([q, q[:, :1]], 1), k, v, doc), "must be \\[B, H, S, D\\]"),  # 3 query heads, 2 KV heads
        ((q, k, v[:, :1], doc), "must be \\[B, H, S, D\\]"),
        ((q, k.double(), v, doc), "share one of"),
        ((q.double(), k.double(), v.double(), doc), "share one of"),
        ((q, k, v, doc.float()), "doc must be"),
        ((q, k, v, doc[:, :7]), "doc must be"),
        ((q[:, :, :0], k[:, :, :0], v[:, :, :0], doc[:, :0]), "empty sequence"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            document_attention(*args)
    q24, k24, v24, _ = _inputs(1, 2, 8, 24)
    with pytest.raises(RuntimeError, match="power-of-two head dim"):
        document_attention_lse(q24, k24, v24, doc, None, None, None, True)
    with pytest.raises(ValueError, match="window must be at least 1"):
        document_attention(q, k, v, doc, window=0)
    for cap in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap must be positive and finite"):
            document_attention(q, k, v, doc, softcap=cap)


# --- the Triton kernels, interpreted on CPU ----------------------------------------------------------
# Small tiles (16 x 16) so that S=50 and S=64 cross many tiles, documents straddle tile edges, and
# key tiles before a document's start are skipped; D=16 and 32; B=2, H=2; the full op too (autograd).

_INTERPRETED = textwrap.dedent("""
    import torch
    from autosp.kernels import document_attention as da
    from tests.kernels.test_document_attention import CPU_TOL, LAYOUTS_50, _assert_close, _inputs, doc_ids

    layouts = dict(LAYOUTS_50)
    layouts["aligned_64"] = [[16, 16, 32], [64]]            # documents on tile edges
    layouts["straddling_64"] = [[1, 20, 9, 17, 17], [40, 1, 1, 22]]
    layouts["no_documents"] = None
    # each layout with each window and each tile shape, every (window, tile) pair on some layout
    # (a Latin square: a third of the cross product, which took CI 50 s interpreted)
    windows, tiles = (None, 5, 20), ((16, (16, 16)), (32, (32, 16)), (16, (16, 32)))
    cases = [(name, windows[(i + j) % 3], *tiles[j]) for i, name in enumerate(sorted(layouts)) for j in range(3)]
    assert {(w, d, b) for _, w, d, b in cases} == {(w, d, b) for w in windows for d, b in tiles}
    for name, window, dim, block in cases:
        lengths = layouts[name]
        seq = 64 if lengths is None else sum(lengths[0])
        q, k, v, do = _inputs(2, 2, seq, dim, seed=seq + dim)
        doc = None if lengths is None else doc_ids(lengths)
        scale = dim ** -0.5
        want_o, want_lse = da.document_attention_reference(q, k, v, doc, None, window)
        o, lse = da._forward_triton(q, k, v, doc, scale, window, block=block)
        want = da.document_attention_reference_backward(do, q, k, v, want_o, want_lse, doc, scale, window)
        got = da._backward_triton(do, q, k, v, o, lse, doc, scale, window, block=block)
        _assert_close((o, lse, *got), (want_o, want_lse, *want), CPU_TOL)

    # grouped KV: 4 query heads on 2 and on 1 KV heads, documents and a window
    for kv_heads in (2, 1):
        q, _, _, do = _inputs(2, 4, 50, 16, seed=kv_heads)
        _, k, v, _ = _inputs(2, kv_heads, 50, 16, seed=10 + kv_heads)
        doc = doc_ids(LAYOUTS_50["rows_differ"])
        want_o, want_lse = da.document_attention_reference(q, k, v, doc, None, 7)
        o, lse = da._forward_triton(q, k, v, doc, 0.25, 7, block=(16, 16))
        want = da.document_attention_reference_backward(do, q, k, v, want_o, want_lse, doc, 0.25, 7)
        got = da._backward_triton(do, q, k, v, o, lse, doc, 0.25, 7, block=(16, 16))
        _assert_close((o, lse, *got), (want_o, want_lse, *want), CPU_TOL)

    # a softcap (Gemma 2's bound, small enough to bend): documents and a window, grouped KV, both tiles
    for name, window, kv_heads, block in (("straddling_64", 20, 2, (16, 16)), ("no_documents", None, 1, (32, 16)),
                                          ("aligned_64", 5, 2, (16, 32))):
        lengths = layouts[name]
        q, _, _, do = _inputs(2, 2, 64, 16, seed=kv_heads + len(name))
        _, k, v, _ = _inputs(2, kv_heads, 64, 16, seed=30 + kv_heads)
        doc = None if lengths is None else doc_ids(lengths)
        want_o, want_lse = da.document_attention_reference(q, k, v, doc, 0.5, window, 0.7)
        o, lse = da._forward_triton(q, k, v, doc, 0.5, window, 0.7, block=block)
        want = da.document_attention_reference_backward(do, q, k, v, want_o, want_lse, doc, 0.5, window, 0.7)
        got = da._backward_triton(do, q, k, v, o, lse, doc, 0.5, window, 0.7, block=block)
        _assert_close((o, lse, *got), (want_o, want_lse, *want), CPU_TOL)

    # the whole op with autograd, strided inputs, default (Hopper) tiles: S=50 < one tile
    g = torch.Generator().manual_seed(9)
    q, k, v, do = (torch.randn(2, 50, 2, 16, generator=g).transpose(1, 2) for _ in range(4))
    doc = doc_ids(LAYOUTS_50["unequal_with_singletons"], dtype=torch.int32)
    results = []
    for use_triton in (True, False):
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        o, lse = da.document_attention_lse(qg, kg, vg, doc, None, None, None, use_triton)
        results.append((o, lse, *torch.autograd.grad(o, (qg, kg, vg), do)))
    _assert_close(results[0], results[1], CPU_TOL)

    try:  # a decreasing id is caught (on the stream; here at once)
        da._forward_triton(q, k, v, doc.flip(1), 0.25)
    except RuntimeError as e:
        assert "nondecreasing" in str(e), e
    else:
        raise AssertionError("decreasing document ids were not caught")
    print("interpreted ok")
""")


def test_triton_kernels_match_reference_interpreted():
    triton = pytest.importorskip("triton")
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9):
        # Triton 3.6's interpreter (the GPU image's) cannot take a loop bound loaded from memory,
        # which the kernels use (compiled, 3.6 runs them: the cuda tests below); checked on 3.9.
        pytest.skip(f"interpreter of Triton {triton.__version__}: loop bounds loaded from memory need 3.9")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300,
                          cwd=_REPO)
    assert proc.returncode == 0 and "interpreted ok" in proc.stdout, proc.stderr[-3000:]


# --- GPU: bf16 kernels against the float32 reference on the same GPU -------------------------------

GPU_LAYOUTS_4096 = {
    "one_document": [[4096]],
    "unequal_with_singletons": [[1, 1000, 1, 1, 63, 64, 2048, 1, 917]],
    "many_short": [[128] * 16 + [1] * 32 + [2016]],
}


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("layout", sorted(GPU_LAYOUTS_4096))
def test_cuda_bf16_matches_float32_reference(layout, dim):
    q, k, v, do = _inputs(1, 4, 4096, dim, dtype=torch.bfloat16, device="cuda", seed=dim)
    doc = doc_ids(GPU_LAYOUTS_4096[layout], device="cuda")
    scale = dim ** -0.5
    want_o, want_lse = document_attention_reference(q, k, v, doc)  # float32 math on the bf16 inputs
    want_o32 = document_attention_reference(q.float(), k.float(), v.float(), doc)[0]
    want = da.document_attention_reference_backward(do.float(), q.float(), k.float(), v.float(), want_o32,
                                                    want_lse, doc, scale)
    got = _run(q, k, v, do, doc)
    assert all(x.dtype == torch.bfloat16 for x in got[:1] + got[2:])
    torch.testing.assert_close(got[1], want_lse, atol=1e-2, rtol=1e-3)  # float32 lse from bf16-rounded products
    for name, x, y in zip(("o", "dq", "dk", "dv"), got[:1] + got[2:], (want_o32, *want), strict=True):
        atol, rtol = GPU_TOLERANCES[name]
        err = (x.float() - y).abs().max().item()
        torch.testing.assert_close(x.float(), y, atol=atol, rtol=rtol,
                                   msg=lambda m, name=name, err=err: f"{layout} D={dim} {name} (max err {err:.3g}): {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("layout,window", [(None, 1000), ("unequal_with_singletons", 300)])
def test_cuda_bf16_window_matches_float32_reference(layout, window, dim):
    """A sliding window (one document a row, and packed documents), against the float32 reference."""
    q, k, v, do = _inputs(1, 4, 4096, dim, dtype=torch.bfloat16, device="cuda", seed=dim + window)
    doc = None if layout is None else doc_ids(GPU_LAYOUTS_4096[layout], device="cuda")
    scale = dim ** -0.5
    want_o, want_lse = document_attention_reference(q, k, v, doc, None, window)
    want_o32 = document_attention_reference(q.float(), k.float(), v.float(), doc, None, window)[0]
    want = da.document_attention_reference_backward(do.float(), q.float(), k.float(), v.float(), want_o32,
                                                    want_lse, doc, scale, window)
    got = _run(q, k, v, do, doc, window=window)
    torch.testing.assert_close(got[1], want_lse, atol=1e-2, rtol=1e-3)
    for name, x, y in zip(("o", "dq", "dk", "dv"), got[:1] + got[2:], (want_o32, *want), strict=True):
        atol, rtol = GPU_TOLERANCES[name]
        torch.testing.assert_close(x.float(), y, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128])
def test_cuda_bf16_grouped_kv_matches_float32_reference(dim):
    """8 query heads on 2 KV heads (Llama's 4:1 group), packed documents, against the float32 reference."""
    q, _, _, do = _inputs(1, 8, 4096, dim, dtype=torch.bfloat16, device="cuda", seed=dim)
    _, k, v, _ = _inputs(1, 2, 4096, dim, dtype=torch.bfloat16, device="cuda", seed=dim + 1)
    doc = doc_ids(GPU_LAYOUTS_4096["many_short"], device="cuda")
    scale = dim ** -0.5
    want_o, want_lse = document_attention_reference(q, k, v, doc)
    want_o32 = document_attention_reference(q.float(), k.float(), v.float(), doc)[0]
    want = da.document_attention_reference_backward(do.float(), q.float(), k.float(), v.float(), want_o32,
                                                    want_lse, doc, scale)
    got = _run(q, k, v, do, doc)
    assert got[3].shape == k.shape and got[4].shape == v.shape
    torch.testing.assert_close(got[1], want_lse, atol=1e-2, rtol=1e-3)
    for name, x, y in zip(("o", "dq", "dk", "dv"), got[:1] + got[2:], (want_o32, *want), strict=True):
        atol, rtol = GPU_TOLERANCES[name]
        if name in ("dk", "dv"):  # sums over the 4 query heads of a KV head: twice the magnitude
            atol, rtol = 2 * atol, 2 * rtol
        torch.testing.assert_close(x.float(), y, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_cuda_other_dtypes_odd_shapes(dtype, tol):
    """S=1000 (not a multiple of the tiles), 3 heads, strided inputs, D=32 and 256."""
    for dim in (32, 256):
        g = torch.Generator().manual_seed(dim)
        q, k, v, do = (torch.randn(2, 1000, 3, dim, generator=g).to("cuda", dtype).transpose(1, 2) for _ in range(4))
        doc = doc_ids([[1, 300, 77, 1, 621], [1000]], device="cuda")
        want = _run(q.float(), k.float(), v.float(), do.float(), doc, use_triton=False)
        got = _run(q, k, v, do, doc)
        _assert_close([x.float() for x in got], want, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [128, 256])
@pytest.mark.parametrize("layout,window", [(None, None), ("unequal_with_singletons", 300)])
def test_cuda_bf16_softcap_matches_float32_reference(layout, window, dim):
    """Gemma 2's bound (cap 50 at its scale; here 2.0 so that it bends scores of unit variance),
    head dims 128 and 256 (Gemma 2's), 8 query heads on 4 KV heads, against the float32 reference."""
    q, _, _, do = _inputs(1, 8, 4096, dim, dtype=torch.bfloat16, device="cuda", seed=dim)
    _, k, v, _ = _inputs(1, 4, 4096, dim, dtype=torch.bfloat16, device="cuda", seed=dim + 1)
    q = q * 3  # scores of a few units: the cap at 2.0 bounds most of them
    doc = None if layout is None else doc_ids(GPU_LAYOUTS_4096[layout], device="cuda")
    scale = dim ** -0.5
    want_o, want_lse = document_attention_reference(q, k, v, doc, None, window, 2.0)
    want_o32 = document_attention_reference(q.float(), k.float(), v.float(), doc, None, window, 2.0)[0]
    want = da.document_attention_reference_backward(do.float(), q.float(), k.float(), v.float(), want_o32,
                                                    want_lse, doc, scale, window, 2.0)
    got = _run(q, k, v, do, doc, window=window, softcap=2.0)
    torch.testing.assert_close(got[1], want_lse, atol=1e-2, rtol=1e-3)
    for name, x, y in zip(("o", "dq", "dk", "dv"), got[:1] + got[2:], (want_o32, *want), strict=True):
        atol, rtol = GPU_TOLERANCES[name]
        if name in ("dk", "dv"):  # sums over the 2 query heads of a KV head
            atol, rtol = 2 * atol, 2 * rtol
        torch.testing.assert_close(x.float(), y, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")
