"""Fused linear + cross-entropy: the loss of ``cross_entropy(h @ W.T, target, reduction="sum")``
and its gradients, computed over row chunks so that the ``[N, V]`` logits never exist.

    loss, grad_h, grad_w = linear_cross_entropy(h_ND, w_VD, target_N, ignore_index, chunk, upcast)

One pass over the rows: for each chunk of ``chunk`` rows the logits ``[chunk, V]`` are made
(in ``h``'s dtype, upcast to float32 when the model upcasts them, as HF's ``logits.float()``),
their log-sum-exp (float32) gives the loss, and ``softmax - onehot`` is the gradient of the logits; it is
cast back to ``h``'s dtype (as autograd would cast it through ``.float()``) and turned into the
chunk's ``grad_h`` rows and its contribution to ``grad_w`` (accumulated in float32). The backward
then only scales the saved gradients by the loss's incoming gradient. Peak extra memory: two
``[chunk, V]`` float32 blocks, ``grad_h`` (the size of ``h``) and one float32 ``[V, D]`` buffer.

The chunk's math is plain torch (``autosp.kernels.reference.linear_cross_entropy``, the same
function tests use); a fused Triton kernel per chunk (logits tile, online log-sum-exp and the
gradient in one pass over the vocabulary, as Liger does) is the next step and is not written
yet: today the op calls the reference on every device. The op is a ``torch.library`` custom op, so Inductor treats it as one opaque call and cannot
re-fuse the chunks back into the whole logits; its fake implementation gives shapes to
Dynamo/AOTAutograd and its autograd formula is registered below. Legend: N rows (tokens),
D hidden, V vocabulary, C chunk rows.
"""

from __future__ import annotations

import torch

from autosp.kernels import reference

CHUNK_BYTES = 1 << 30  # float32 logits of one chunk: 1 GiB unless the caller says otherwise


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
    return reference.linear_cross_entropy(h, w, target, ignore_index, chunk, upcast, with_grads)


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
