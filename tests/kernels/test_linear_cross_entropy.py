"""linear_cross_entropy: the plain-torch reference equals autograd of ``F.cross_entropy`` on the
whole logits; the Triton kernel path equals the reference (on CPU under TRITON_INTERPRET=1, and
on a GPU). Legend: N rows, D hidden, V vocab, C chunk rows.

Tolerances, kernel path against the reference (same matmuls, so only the softmax part differs):

    dtype     atol  rtol    why
    float32   1e-6  1e-5    online vs two-pass log-sum-exp and Triton's exp: a few float32 ulps
    float16   1e-3  1e-3    the gradient is rounded to fp16 once on both sides; a float32 ulp of
                            difference can flip one fp16 ulp (2**-11 relative) of a gradient element
    bfloat16  1e-2  1.6e-2  one bf16 ulp (2**-8 relative) of grad_h / grad_w. Under the interpreter
                            every element can differ by one ulp: Triton 3.9's interpreter truncates
                            float32 -> bf16 casts (cast_impl passes no rounding mode) where the GPU
                            rounds to nearest-even, so the GPU test is the check of the rounding
    loss      1e-6  1e-5    float32 on both sides, any dtype (per-row sums added in the same order)

The reference against autograd: float64 inputs still take the log-sum-exp and softmax in
float32 (the reference's ``.float()``), hence 1e-6; float32 1e-5 (the chunked sums reorder
additions). Shapes are odd on purpose (V=1000 not a multiple of the kernel's block, 13 rows in
chunks of 5, a last chunk whose rows are all ignored) and the logits small (std ~0.85) so that
every vocabulary entry, the masked tail of the last block included, weighs in the log-sum-exp.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from autosp.kernels import reference
from autosp.kernels.linear_cross_entropy import add_product_f32, chunked_linear_cross_entropy, linear_cross_entropy_loss

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _inputs(dtype, n=13, d=8, v=1000, ignore_index=-100, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h_ND = torch.randn(n, d, generator=g).to(device, dtype)
    w_VD = (torch.randn(v, d, generator=g) * 0.3).to(device, dtype)
    t_N = torch.randint(0, v, (n,), generator=g)
    t_N[0], t_N[1] = v - 1, 0  # targets in the masked last block and in the first column
    t_N[4] = ignore_index
    t_N[10:] = ignore_index  # with chunk 5 the last chunk (rows 10..12) has no valid row
    return h_ND, w_VD, t_N.to(device)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("upcast", [True, False])
def test_reference_equals_autograd_of_cross_entropy(dtype, tol, chunk, upcast):
    h_ND, w_VD, t_N = _inputs(dtype)
    h_ND.requires_grad_()
    w_VD.requires_grad_()
    want = F.cross_entropy(h_ND @ w_VD.t(), t_N, reduction="sum", ignore_index=-100)
    want_h, want_w = torch.autograd.grad(want, (h_ND, w_VD))
    with torch.no_grad():
        loss, grad_h, grad_w = reference.linear_cross_entropy(h_ND, w_VD, t_N, -100, chunk, upcast, True)
        loss_only, empty_h, empty_w = reference.linear_cross_entropy(h_ND, w_VD, t_N, -100, chunk, upcast, False)
    assert loss.dtype == torch.float32 and grad_h.dtype == dtype and grad_w.dtype == dtype
    torch.testing.assert_close(loss.double(), want.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad_h, want_h, rtol=tol, atol=tol)
    torch.testing.assert_close(grad_w, want_w, rtol=tol, atol=tol)
    assert torch.equal(loss_only, loss) and empty_h.numel() == 0 and empty_w.numel() == 0
    assert grad_h[4].abs().max() == 0 and grad_h[10:].abs().max() == 0  # ignored rows take no gradient


def test_reference_with_an_ignore_index_inside_the_vocabulary():
    h_ND, w_VD, t_N = _inputs(torch.float64, ignore_index=7)
    h_ND.requires_grad_()
    w_VD.requires_grad_()
    want = F.cross_entropy(h_ND @ w_VD.t(), t_N, reduction="sum", ignore_index=7)
    want_h, want_w = torch.autograd.grad(want, (h_ND, w_VD))
    with torch.no_grad():
        loss, grad_h, grad_w = reference.linear_cross_entropy(h_ND, w_VD, t_N, 7, 5, True, True)
    torch.testing.assert_close(loss.double(), want.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_h, want_h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_w, want_w, rtol=1e-6, atol=1e-6)


_INTERPRETED = textwrap.dedent("""
    import torch
    from autosp.kernels import reference
    from autosp.kernels.linear_cross_entropy import chunked_linear_cross_entropy
    from tests.kernels.test_linear_cross_entropy import TOLERANCES, _inputs

    def check(dtype, upcast, with_grads, ignore_index=-100, block_v=256):
        h_ND, w_VD, t_N = _inputs(dtype, ignore_index=ignore_index)
        want = reference.linear_cross_entropy(h_ND, w_VD, t_N, ignore_index, 5, upcast, with_grads)
        got = chunked_linear_cross_entropy(h_ND, w_VD, t_N, ignore_index, 5, upcast, with_grads,
                                           use_triton=True, block_v=block_v)
        atol, rtol = TOLERANCES["loss"]
        torch.testing.assert_close(got[0], want[0], atol=atol, rtol=rtol)
        atol, rtol = TOLERANCES[dtype]
        for name, a, b in (("grad_h", got[1], want[1]), ("grad_w", got[2], want[2])):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, a.shape, b.dtype, b.shape)
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name} {dtype}: {m}")

    for dtype in (torch.float32, torch.bfloat16):
        for upcast in (True, False):
            for with_grads in (True, False):
                check(dtype, upcast, with_grads)
    check(torch.float16, True, True)
    check(torch.float32, True, True, block_v=None)    # default block: one block, V < BLOCK_V
    check(torch.float32, True, True, ignore_index=7)  # an ignore_index that is also a vocabulary id
    h_ND, w_VD, t_N = _inputs(torch.float32)
    t_N[3] = 1000
    try:
        chunked_linear_cross_entropy(h_ND, w_VD, t_N, -100, 5, True, True, use_triton=True, block_v=256)
    except RuntimeError as e:
        assert "outside [0, V)" in str(e), e
    else:
        raise AssertionError("a target out of the vocabulary was not caught")
    print("interpreted ok")
""")

TOLERANCES = {  # (atol, rtol), see the module docstring
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
    "loss": (1e-6, 1e-5),
}


def test_triton_kernel_matches_reference_interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300,
                          cwd=_REPO)
    assert proc.returncode == 0 and "interpreted ok" in proc.stdout, proc.stderr[-3000:]


def test_cpu_runs_the_reference_by_default():
    h_ND, w_VD, t_N = _inputs(torch.float32)
    got = chunked_linear_cross_entropy(h_ND, w_VD, t_N, -100, 5, True, True)
    want = reference.linear_cross_entropy(h_ND, w_VD, t_N, -100, 5, True, True)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_matches_reference_on_cuda(monkeypatch, dtype):
    h_ND, w_VD, t_N = _inputs(dtype, n=300, d=64, v=32003, seed=1, device="cuda")
    h_ND = h_ND * 0.5  # logits std ~1.2 at D=64
    t_N[100:140] = -100
    want = reference.linear_cross_entropy(h_ND, w_VD, t_N, -100, 128, True, True)
    calls = []
    monkeypatch.setattr(reference, "linear_cross_entropy", lambda *a: calls.append(a))  # the op must not call it
    h_ND.requires_grad_()
    w_VD.requires_grad_()
    loss = linear_cross_entropy_loss(h_ND, w_VD, t_N, -100, 128)
    loss.backward()
    assert not calls
    atol, rtol = TOLERANCES["loss"]
    torch.testing.assert_close(loss, want[0], atol=atol, rtol=rtol)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(h_ND.grad, want[1], atol=atol, rtol=rtol)
    torch.testing.assert_close(w_VD.grad, want[2], atol=atol, rtol=rtol)
    with torch.no_grad():
        loss_only = linear_cross_entropy_loss(h_ND, w_VD, t_N, -100, 128)
    torch.testing.assert_close(loss_only, loss.detach(), atol=0, rtol=0)


def _accumulated(device, dtype):
    """Three ``[96, 200] @ [200, 48]`` products of ``dtype`` through ``add_product_f32``; checks the
    sum is float32 and stays in the first product's buffer. Returns the parts and the sum."""
    g = torch.Generator().manual_seed(0)
    parts = [(torch.randn(96, 200, generator=g).to(device, dtype), torch.randn(200, 48, generator=g).to(device, dtype))
             for _ in range(3)]
    acc = add_product_f32(None, *parts[0])
    first = acc.data_ptr()
    for a, b in parts[1:]:
        acc = add_product_f32(acc, a, b)
    assert acc.dtype == torch.float32 and acc.data_ptr() == first
    return parts, acc


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_float32_products_add_into_the_accumulator_in_place(device):
    """``add_product_f32`` on float32 matrices: ``addmm_`` into the accumulator, no product apart."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    parts, acc = _accumulated(device, torch.float32)
    exact = sum(a.double() @ b.double() for a, b in parts)
    torch.testing.assert_close(acc.double(), exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_products_add_into_one_float32_accumulator(device):
    """``add_product_f32``: a first product made in float32, the next ones added in place; on CUDA
    the half-precision products are not rounded to bfloat16 on the way (closer to float64 than
    the bfloat16 product added after, by the rounding it skips)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    parts, acc = _accumulated(device, torch.bfloat16)
    exact = sum(a.double() @ b.double() for a, b in parts)
    rounded = sum((a @ b).float() for a, b in parts)
    err = (acc.double() - exact).abs().max().item()
    if device == "cuda":
        assert err < 1e-3 < (rounded.double() - exact).abs().max().item(), err
    else:
        assert torch.equal(acc, rounded)
