"""chunked_attention: o, lse and every gradient equal F.scaled_dot_product_attention (math, float64)
for causal and non-causal attention, odd lengths, any chunk count and GQA; pairs above the
diagonal never run; offload changes nothing but what is saved; the fake impl serves
torch.compile; on a GPU, each CUDA backend in bf16 is as close to the truth as SDPA's own."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

from autosp import _torch_private as tp
from autosp.kernels import chunked_attention as ca
from autosp.kernels import host_offload, reference
from autosp.kernels.chunked_attention import chunk_bounds, chunked_attention, chunked_scaled_dot_product_attention


def _inputs(b, heads, kv_heads, seq, dim, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(b, h, seq, dim, generator=g, dtype=torch.float64)
                   for h in (heads, kv_heads, kv_heads, heads))
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v, do))


def _truth(q, k, v, do, is_causal, scale):
    """F.scaled_dot_product_attention (math) in float64: o, lse of the scaled scores, dq, dk, dv."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=True)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do.double())
    group = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return o.detach(), s.logsumexp(-1).detach(), dq, dk, dv


def _run(q, k, v, do, is_causal, scale, chunks, offload=False, backend="auto"):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o, lse, _ = chunked_attention(q, k, v, is_causal, scale, chunks, offload, backend)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return o.detach(), lse, dq, dk, dv


def _assert_matches_truth(got, want, tol):
    for name, x, y in zip(("o", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert x.shape == y.shape, name
        torch.testing.assert_close(x.double(), y, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


# float32 inputs against the float64 truth: float32 rounding of o and of the kernels' sums
# (observed max abs error ~3e-6 on these unit-variance inputs).
CPU_TOL = 1e-5


@pytest.mark.parametrize("backend", ["auto", "math"])  # auto = CPU flash attention here
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("seq,chunks", [(37, 1), (37, 2), (37, 3), (37, 5), (123, 7), (5, 8)])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (6, 3)])
def test_equals_sdpa(backend, is_causal, seq, chunks, heads, kv_heads):
    q, k, v, do = _inputs(2, heads, kv_heads, seq, 16, seed=seq + chunks)
    got = _run(q, k, v, do, is_causal, None, chunks, backend=backend)
    _assert_matches_truth(got, _truth(q, k, v, do, is_causal, None), CPU_TOL)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32


def test_float64_mha_explicit_scale_and_reference():
    q, k, v, do = _inputs(2, 4, 4, 33, 8, dtype=torch.float64, seed=3)
    want = _truth(q, k, v, do, True, 0.3)
    _assert_matches_truth(_run(q, k, v, do, True, 0.3, 4), want, 1e-6)  # lse is float32
    o, lse = reference.chunked_attention(q, k, v, True, 0.3)
    torch.testing.assert_close(o, want[0])
    torch.testing.assert_close(lse.double(), want[1], rtol=1e-6, atol=1e-6)


def test_lse_is_not_differentiable_and_o_keeps_dtype():
    q, k, v, _ = _inputs(1, 2, 1, 9, 8, dtype=torch.bfloat16)
    q.requires_grad_()
    o, lse, host = chunked_attention(q, k, v, True, None, 2, False)
    assert o.requires_grad and not lse.requires_grad and host == []
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32 and o.is_contiguous()


def test_chunk_bounds():
    assert chunk_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert chunk_bounds(3, 5) == [(0, 1), (1, 2), (2, 3)]  # fewer chunks than asked
    assert chunk_bounds(7, 1) == [(0, 7)]


@pytest.mark.parametrize("is_causal", [False, True])
def test_pairs_above_the_diagonal_never_run(monkeypatch, is_causal):
    """Count the primitive calls and locate each pair from its views' storage offsets."""
    calls = []
    forward, backward = ca._pair_forward, ca._pair_backward

    def where(q, k):  # chunk starts, from contiguous [B, heads, S, H] inputs
        return q.storage_offset() // q.shape[-1], k.storage_offset() // k.shape[-1]

    def counted_forward(q, k, v, causal, scale, kernel):
        calls.append(("fw", *where(q, k), causal))
        return forward(q, k, v, causal, scale, kernel)

    def counted_backward(do, q, k, v, o, lse, causal, scale, kernel):
        calls.append(("bw", *where(q, k), causal))
        return backward(do, q, k, v, o, lse, causal, scale, kernel)

    monkeypatch.setattr(ca, "_pair_forward", counted_forward)
    monkeypatch.setattr(ca, "_pair_backward", counted_backward)
    q, k, v, do = _inputs(2, 6, 2, 37, 8)
    got = _run(q, k, v, do, is_causal, None, 5)
    _assert_matches_truth(got, _truth(q, k, v, do, is_causal, None), CPU_TOL)
    starts = [a for a, _ in chunk_bounds(37, 5)]
    pairs = {(qs, ks) for qs in starts for ks in starts if ks <= qs or not is_causal}
    for phase in ("fw", "bw"):
        seen = [c[1:] for c in calls if c[0] == phase]
        assert len(seen) == (15 if is_causal else 25)
        assert {(qs, ks) for qs, ks, _ in seen} == pairs  # each visible pair once, nothing above
        assert all(causal == (is_causal and qs == ks) for qs, ks, causal in seen)


def test_offload_same_results_and_saves_host_chunks():
    q, k, v, do = _inputs(2, 6, 3, 37, 16)
    plain = _run(q, k, v, do, True, None, 3)
    offloaded = _run(q, k, v, do, True, None, 3, offload=True)
    for x, y in zip(plain, offloaded, strict=True):
        assert torch.equal(x, y)
    qg = q.detach().requires_grad_()
    o, _, host = chunked_attention(qg, k, v, True, None, 3, True)
    saved = o.grad_fn.saved_tensors  # q, o, lse, k, v: one copy per chunk, never the inputs
    assert len(saved) == 15 and all(a is b for a, b in zip(saved, host, strict=True))  # the op's own outputs
    assert not any(t.requires_grad for t in host) and [t.shape[2] for t in saved[:3]] == [13, 12, 12]
    assert all(t.is_contiguous() and t.untyped_storage().data_ptr() not in
               (q.untyped_storage().data_ptr(), o.untyped_storage().data_ptr()) for t in saved)


@pytest.mark.parametrize("offload", [False, True])
def test_torch_compile_fullgraph(offload):
    """aot_eager with the fake impls; with offload every value saved for the backward is one of the
    host chunks the op returns (nothing of the forward stays on the device)."""
    seen = {}

    def forward_hook(gm, inputs):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        seen["saved"] = list(outputs[tp.num_forward_returns():])
        return inputs

    def backward_hook(gm, inputs):
        seen["bw"] = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        return inputs

    def backend(gm, inputs):
        return tp.compile_partitioned(gm, inputs, "aot_eager", forward_hook, backward_hook)

    def f(q, k, v):
        return chunked_scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, chunks=3,
                                                    offload=offload) * 2  # saves nothing itself

    q, k, v, _ = _inputs(2, 6, 2, 37, 8, seed=5)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    compiled = torch.compile(f, backend=backend, fullgraph=True)(*inputs)
    grads = torch.autograd.grad(compiled.sum(), inputs)
    eager_inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    eager = f(*eager_inputs)
    torch.testing.assert_close(compiled, eager)
    for x, y in zip(grads, torch.autograd.grad(eager.sum(), eager_inputs), strict=True):
        torch.testing.assert_close(x, y)
    assert "autosp.chunked_attention_backward.default" in seen["bw"]
    def host_chunk(n):  # getitem(getitem(chunked_attention(...), 2), i)
        src = n.args[0] if n.target is operator.getitem else None
        return (src is not None and src.target is operator.getitem and src.args[1] == 2
                and src.args[0].target is torch.ops.autosp.chunked_attention.default)

    if offload:  # q, o, lse, k, v in 3 chunks each
        assert len(seen["saved"]) == 15 and all(host_chunk(n) for n in seen["saved"])
    else:
        assert not any(host_chunk(n) for n in seen["saved"])


def test_bad_inputs():
    q, k, v, _ = _inputs(1, 6, 2, 8, 4)
    cases = [
        ((q[0], k, v, True, None, 2, False), "must be \\[B, heads, S, H\\]"),
        ((q, k[:, :, :7], v[:, :, :7], True, None, 2, False), "self-attention"),
        ((q, k[:, :1].expand(1, 4, 8, 4), v[:, :1].expand(1, 4, 8, 4), True, None, 2, False), "not a multiple"),
        ((q, k.double(), v, True, None, 2, False), "share one of"),
        ((q.int(), k.int(), v.int(), True, None, 2, False), "share one of"),
        ((q, k, v, True, None, 0, False), "chunks must be"),
        ((q, k, v, True, None, 2, False, "nope"), "backend must be"),
        ((q, k, v, True, None, 2, False, "flash"), "does not run on cpu"),
        ((q[:, :, :0], k[:, :, :0], v[:, :, :0], True, None, 2, False), "empty sequence"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            chunked_attention(*args)
    with pytest.raises(ValueError, match="attn_mask is not supported"):
        chunked_scaled_dot_product_attention(q, k, v, torch.ones(8, 8, dtype=torch.bool), chunks=2, enable_gqa=True)
    with pytest.raises(ValueError, match="dropout"):
        chunked_scaled_dot_product_attention(q, k, v, dropout_p=0.1, chunks=2, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        chunked_scaled_dot_product_attention(q, k, v, chunks=2)


# --- GPU: bf16 against the float64 truth, each backend no worse than SDPA's own bf16 kernel -----
# Tolerance: max |ours - truth| <= 2 * max |SDPA(bf16, its default backend) - truth| + 1e-3 for
# o, dq, dk, dv (bf16 inputs and outputs: the kernels' own rounding; chunking adds one bf16
# rounding per pair result that is summed in float32); lse (float32 throughout) within 1e-3.


def _sdpa_bf16(q, k, v, do, is_causal):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    return (o.detach(), *torch.autograd.grad(o, (q, k, v), do))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "flash", "efficient", "cudnn", "math"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_cuda_bf16_backends_match_sdpa(backend, is_causal):
    q, k, v, do = _inputs(2, 8, 2, 1000, 128, dtype=torch.bfloat16, device="cuda", seed=7)
    want = _truth(q, k, v, do, is_causal, None)
    sdpa = _sdpa_bf16(q, k, v, do, is_causal)
    got = _run(q, k, v, do, is_causal, None, 3, backend=backend)
    torch.testing.assert_close(got[1].double(), want[1], rtol=0, atol=1e-3)
    for name, x, s, y in zip(("o", "dq", "dk", "dv"), got[:1] + got[2:], sdpa, want[:1] + want[2:], strict=True):
        ours, theirs = (x.double() - y).abs().max().item(), (s.double() - y).abs().max().item()
        assert ours <= 2 * theirs + 1e-3, f"{backend} {name}: error {ours:.3g}, SDPA's {theirs:.3g}"


@pytest.mark.gpu
def test_cuda_float32_and_odd_shapes():
    """float32 (auto: efficient), odd S, S % chunks != 0, head dim 72, MHA and GQA."""
    for heads, kv_heads in ((6, 6), (6, 3)):
        q, k, v, do = _inputs(2, heads, kv_heads, 123, 72, device="cuda", seed=heads + kv_heads)
        _assert_matches_truth(_run(q, k, v, do, True, None, 5), _truth(q, k, v, do, True, None), 2e-4)


@pytest.mark.gpu
def test_cuda_offload_saves_pinned_host_chunks():
    q, k, v, do = _inputs(2, 8, 2, 1000, 64, dtype=torch.bfloat16, device="cuda", seed=8)
    plain = _run(q, k, v, do, True, None, 4)
    offloaded = _run(q, k, v, do, True, None, 4, offload=True)
    for x, y in zip(plain, offloaded, strict=True):  # the kernels' backward may be non-deterministic
        torch.testing.assert_close(x, y)
    assert host_offload.in_flight() == 0  # every prefetched chunk was used
    o, _, _ = chunked_attention(q.detach().requires_grad_(), k, v, True, None, 4, True)
    saved = o.grad_fn.saved_tensors
    assert len(saved) == 20 and all(t.device.type == "cpu" and t.is_pinned() for t in saved)
