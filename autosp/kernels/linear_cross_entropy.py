"""Fused linear + cross-entropy: the loss of ``cross_entropy(h @ W.T, target, reduction="sum")``
and its gradients, computed over row chunks so that the ``[N, V]`` logits never exist.

    loss, grad_h, grad_w = linear_cross_entropy(h_ND, w_VD, target_N, ignore_index, chunk, upcast, with_grads)

One pass over the rows: for each chunk of ``chunk`` rows the logits ``[C, V]`` are made (a
matmul in ``h``'s dtype), their log-sum-exp (float32) gives the loss, and ``softmax - onehot``
(0 on rows whose target is ``ignore_index``) is the gradient of the logits, rounded to ``h``'s
dtype (as autograd casts it back through HF's ``logits.float()``) and turned into the chunk's
``grad_h`` rows and its contribution to ``grad_w`` (accumulated in float32). The backward then
only scales the saved gradients by the loss's incoming gradient.

On CUDA tensors, when Triton is installed, one Triton program per row does the softmax part
(Liger-Kernel's scheme): a first sweep over the row's vocabulary blocks keeps an online max and
sum (float32) for the log-sum-exp and gives the row's loss ``lse - logit[target]``; a second
sweep writes the gradient over the logits, in place and in their dtype. The chunk's ``g.T @ h``
(half precision on the GPU) goes straight into the float32 ``[V, D]`` accumulator: cuBLAS adds
its float32 product to it (``addmm``'s ``out_dtype``), where a half-precision product and a
float32 ``+=`` would cost one more pass over ``V x D`` a chunk (about 1 ms at Llama-3's
vocabulary on an H200, 4 a step at 8K tokens) and round each chunk's term to ``h``'s dtype.
Peak extra memory: one ``[C, V]`` block in ``h``'s dtype, ``grad_h`` (the size of ``h``) and
the accumulator. Elsewhere (CPU, no Triton)
the chunk's math is plain torch, ``autosp.kernels.reference.linear_cross_entropy``, the same
function the tests compare with; it makes two float32 ``[C, V]`` blocks per chunk.

``upcast`` (the model upcasts its logits, ``logits.float()``) changes no number on either path:
both take the log-sum-exp and the softmax in float32 from the logits in ``h``'s dtype (exact
in float32), and round the gradient once to ``h``'s dtype. The kernel's float32 arithmetic
differs from the reference's only in rounding (online against two-pass log-sum-exp, Triton's
``exp``): a few float32 ulps, which after the gradient's rounding to bf16/fp16 at most flips an
element by one ulp of that dtype.

The op is a ``torch.library`` custom op, so Inductor treats it as one opaque call and cannot
re-fuse the chunks back into the whole logits; its fake implementation gives shapes to
Dynamo/AOTAutograd and its autograd formula is registered below. Legend: N rows (tokens),
D hidden, V vocabulary, C chunk rows.
"""

from __future__ import annotations

import torch

from autosp import _torch_private as tp
from autosp.kernels import reference

try:
    import triton
    import triton.language as tl
except ImportError:  # a platform without Triton: the reference runs
    triton = None

CHUNK_BYTES = 1 << 30  # float32 logits of one chunk: 1 GiB unless the caller says otherwise
MAX_BLOCK_V = 32768  # vocabulary columns a program holds at once (Liger's size; 32 warps keep it in registers)

if triton is not None:

    @triton.jit
    def _cross_entropy_rows_kernel(
        logits_ptr,  # [C, V] logits in h's dtype, unit column stride; the gradient overwrites them (WITH_GRADS)
        row_stride,  # elements between two rows of logits
        target_ptr,  # [C] integer targets (contiguous)
        loss_ptr,  # [C] float32 out: lse - logit[target]; 0 where target == ignore_index
        ignore_index,  # target value of rows that take no loss and a zero gradient
        V: tl.constexpr,  # vocabulary size (columns): the sweeps' bound, known when compiling (one compile a vocab)
        WITH_GRADS: tl.constexpr,  # False: the loss only, logits left untouched
        BLOCK_V: tl.constexpr,  # columns per step of a sweep (power of 2)
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: row * row_stride may pass 2**31
        row_ptr = logits_ptr + row * row_stride
        y = tl.load(target_ptr + row)
        cols = tl.arange(0, BLOCK_V)
        if y == ignore_index:
            tl.store(loss_ptr + row, 0.0)
            if WITH_GRADS:
                zero = tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty)
                for start in range(0, V, BLOCK_V):
                    tl.store(row_ptr + start + cols, zero, mask=start + cols < V)
        else:
            # Sweep 1: online log-sum-exp, m the running max and d the sum of exp(x - m).
            m = float("-inf")
            d = 0.0
            for start in range(0, V, BLOCK_V):
                x = tl.load(row_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m = m_new
            lse = m + tl.log(d)
            x_y = tl.load(row_ptr + y).to(tl.float32)  # read before sweep 2 overwrites it
            tl.store(loss_ptr + row, lse - x_y)
            if WITH_GRADS:
                # Sweep 2: d loss / d logits = exp(x - lse) - [col == y], over the same elements it reads.
                for start in range(0, V, BLOCK_V):
                    mask = start + cols < V
                    x = tl.load(row_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
                    g = tl.exp(x - lse)
                    g = tl.where(start + cols == y, g - 1.0, g)
                    tl.store(row_ptr + start + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _linear_cross_entropy_triton(h_ND: torch.Tensor, w_VD: torch.Tensor, target_N: torch.Tensor, ignore_index: int,
                                 chunk: int, with_grads: bool, block_v: int | None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk loop around the kernel: logits by matmul, the kernel turns them into the gradient
    in place, two matmuls take it to ``grad_h`` and ``grad_w``. Same contract as the reference."""
    n, vocab = h_ND.shape[0], w_VD.shape[0]
    target_N = target_N.contiguous()
    # A target outside [0, V) would make the kernel read out of its row; checked without a host sync.
    tp.assert_async(((target_N == ignore_index) | ((target_N >= 0) & (target_N < vocab))).all(),
                        "linear_cross_entropy: a target is outside [0, V) and is not ignore_index")
    block_v = block_v or min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    num_warps = 4 if block_v <= 2048 else 8 if block_v <= 8192 else 16 if block_v <= 16384 else 32
    loss = torch.zeros((), dtype=torch.float32, device=h_ND.device)
    loss_N = torch.empty(n, dtype=torch.float32, device=h_ND.device)
    grad_h_ND = torch.empty_like(h_ND) if with_grads else None
    grad_w_VD = None  # float32, made by the first chunk's product
    for start in range(0, n, chunk):
        h_CD = h_ND[start:start + chunk]
        logits_CV = h_CD @ w_VD.t()  # contiguous [C, V] in h's dtype; holds the gradient after the kernel
        rows = logits_CV.shape[0]
        _cross_entropy_rows_kernel[(rows,)](logits_CV, logits_CV.stride(0), target_N[start:start + chunk],
                                            loss_N[start:start + chunk], ignore_index, V=vocab,
                                            WITH_GRADS=with_grads, BLOCK_V=block_v, num_warps=num_warps)
        loss += loss_N[start:start + chunk].sum()
        if with_grads:
            grad_h_ND[start:start + chunk] = logits_CV @ w_VD
            grad_w_VD = add_product_f32(grad_w_VD, logits_CV.t(), h_CD)
        del logits_CV
    if not with_grads:
        return loss, h_ND.new_empty((0,)), w_VD.new_empty((0,))
    if grad_w_VD is None:  # no rows
        return loss, grad_h_ND, torch.zeros_like(w_VD)
    return loss, grad_h_ND, grad_w_VD.to(w_VD.dtype)


def add_product_f32(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` in float32, into ``acc`` (``acc`` None: a new ``a @ b``). Half-precision
    CUDA matrices: cuBLAS writes the float32 product into the accumulator itself (``out_dtype``,
    CUDA only); float32 matrices: ``addmm_`` into the accumulator (no ``[V, D]`` product made
    apart: 1 GiB a chunk at a 128K vocabulary and 2048 wide); elsewhere the product in ``a``'s
    dtype is added."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        if acc is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    if a.dtype == torch.float32:
        return a @ b if acc is None else acc.addmm_(a, b)
    product = (a @ b).float()
    return product if acc is None else acc.add_(product)


def chunked_linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, target_N: torch.Tensor, ignore_index: int,
                                 chunk: int, upcast: bool, with_grads: bool, use_triton: bool | None = None,
                                 block_v: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's body (see the module docstring). ``use_triton=None``: the Triton kernel on CUDA
    tensors when Triton is installed, the reference otherwise. ``block_v``: vocabulary columns per
    kernel step (default ``min(MAX_BLOCK_V, next_power_of_2(V))``; tests pass small ones)."""
    if use_triton is None:
        use_triton = triton is not None and h_ND.is_cuda
    if not use_triton:
        return reference.linear_cross_entropy(h_ND, w_VD, target_N, ignore_index, chunk, upcast, with_grads)
    if triton is None:
        raise RuntimeError("linear_cross_entropy: use_triton=True but Triton is not installed")
    return _linear_cross_entropy_triton(h_ND, w_VD, target_N, ignore_index, chunk, with_grads, block_v)


def default_chunk(vocab: int) -> int:
    """Rows per chunk so that one float32 ``[C, V]`` block is about ``CHUNK_BYTES``."""
    return max(16, CHUNK_BYTES // (4 * vocab))


@torch.library.custom_op("autosp::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, ignore_index: int, chunk: int, upcast: bool,
    with_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of the cross-entropy over rows whose target is not ``ignore_index``, and its
    gradients with respect to ``h`` ``[N, D]`` and ``w`` ``[V, D]`` (empty without ``with_grads``)."""
    if h.dim() != 2 or w.dim() != 2 or target.dim() != 1 or h.shape[0] != target.shape[0] or h.shape[1] != w.shape[1]:
        raise ValueError(f"linear_cross_entropy: h {list(h.shape)}, w {list(w.shape)}, target {list(target.shape)}")
    if chunk <= 0:
        raise ValueError(f"linear_cross_entropy: chunk must be positive, got {chunk}")
    return chunked_linear_cross_entropy(h, w, target, ignore_index, chunk, upcast, with_grads)


@linear_cross_entropy.register_fake
def _(h, w, target, ignore_index, chunk, upcast, with_grads):
    if not with_grads:
        return h.new_empty((), dtype=torch.float32), h.new_empty((0,)), w.new_empty((0,))
    return h.new_empty((), dtype=torch.float32), torch.empty_like(h), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    _, grad_h, grad_w = output
    ctx.save_for_backward(grad_h, grad_w)


def _backward(ctx, d_loss, _d_grad_h, _d_grad_w):
    grad_h, grad_w = ctx.saved_tensors
    if grad_h.dim() != 2:
        raise RuntimeError("linear_cross_entropy: backward of a call made with with_grads=False")
    return (grad_h * d_loss.to(grad_h.dtype), grad_w * d_loss.to(grad_w.dtype), None, None, None, None, None)


linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy_loss(h, w, target, ignore_index: int = -100, chunk: int | None = None, upcast: bool = True):
    """The summed loss alone (differentiable in ``h`` and ``w``): what the graph calls. The
    gradients are computed only where autograd will ask for them (not in eval or no_grad)."""
    with_grads = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    chunk = chunk or default_chunk(w.shape[0])
    loss, _, _ = torch.ops.autosp.linear_cross_entropy(h, w, target, ignore_index, chunk, upcast, with_grads)
    return loss
