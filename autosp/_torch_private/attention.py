"""Part of autosp._torch_private (see its docstring): torch's fused SDPA kernels as private aten ops that return the log-sum-exp."""

from __future__ import annotations

import torch

# -------------------------------------------------------------------------------------------------
# Attention kernels that return the log-sum-exp (autosp/kernels/chunked_attention.py)
#
# torch's fused SDPA backends as private aten ops. Each forward wrapper takes q [B, N, L, H] and
# k, v [B, n, M, H] (n = N unless the wrapper says it takes grouped heads) and returns
# (o [B, N, L, H] in q's dtype, lse [B, N, L] contiguous float32, natural log), whatever the
# kernel's own layout; each backward wrapper takes that lse back (it may be another attention's:
# the kernels recompute P = exp(scale * q k^T - lse) and D = rowsum(do * o) from what they are
# given) and returns (dq, dk, dv) shaped like q, k, v. The lse may be a strided view (a chunk of a
# longer one): the backward wrappers make it contiguous, as FlashAttention-2 indexes it as
# contiguous whatever its strides (a view gives wrong gradients without an error). No dropout,
# no mask, no varlen.
# Conventions checked against torch 2.11 on an H100 and torch's meta registrations:
#   flash      lse [B, N, L] float32, natural log; grouped heads (n | N) in both directions;
#              is_causal is aligned bottom-right (FlashAttention-2) when L != M.
#   efficient  lse [B, N, ceil(L / 32) * 32] float32, natural log, padded with +inf (the backward
#              reads the padded rows: +inf gives P = 0 there); needs n == N; its backward needs o
#              in the forward's [B, L, N, H] memory layout (else silently wrong dq, dk).
#   cudnn      lse [B, N, L, 1] float32, natural log; grouped heads in both directions.
#   cpu flash  lse [B, N, L] (a [B, L, N] buffer transposed) in the computation dtype (float64 for
#              float64 inputs, else float32); grouped heads in both directions.
# -------------------------------------------------------------------------------------------------


def sdpa_backend_choice(q, k, v, is_causal: bool, scale: float | None):
    """The ``torch.nn.attention.SDPBackend`` that ``F.scaled_dot_product_attention`` would run for
    these inputs (no mask, no dropout), honouring an enclosing ``sdpa_kernel`` context."""
    from torch.nn.attention import SDPBackend

    choice = torch._fused_sdp_choice(q, k, v, None, 0.0, is_causal, scale=scale, enable_gqa=q.size(1) != k.size(1))
    return SDPBackend(choice)


def flash_attention_lse(q, k, v, is_causal: bool, scale: float | None):
    """CUDA FlashAttention-2 (``aten._scaled_dot_product_flash_attention``): o and lse."""
    out = torch.ops.aten._scaled_dot_product_flash_attention.default(q, k, v, 0.0, is_causal, False, scale=scale)
    return out[0], out[1]


def flash_attention_lse_backward(do, q, k, v, o, lse, is_causal: bool, scale: float | None):
    """dq, dk, dv by ``aten._scaled_dot_product_flash_attention_backward`` (dense inputs: no
    cumulative sequence lengths; no dropout, so the RNG state is never read)."""
    rng = torch.empty((), dtype=torch.int64, device=q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward.default(
        do, q, k, v, o, lse.contiguous(), None, None, q.size(2), k.size(2), 0.0, is_causal, rng, rng, scale=scale)


def efficient_attention_lse(q, k, v, is_causal: bool, scale: float | None):
    """CUDA memory-efficient attention (``aten._scaled_dot_product_efficient_attention``), n == N."""
    out = torch.ops.aten._scaled_dot_product_efficient_attention.default(q, k, v, None, True, 0.0, is_causal,
                                                                         scale=scale)
    return out[0], out[1][..., :q.size(2)].contiguous()


def efficient_attention_lse_backward(do, q, k, v, o, lse, is_causal: bool, scale: float | None):
    """dq, dk, dv by ``aten._scaled_dot_product_efficient_attention_backward``, n == N. The kernel
    reads ``o`` (and ``do``) as laid out by its forward, [B, L, N, H] in memory: any other layout
    gives wrong dq, dk (NaN at times) without an error, so both are copied into it when needed."""
    rows = q.size(2)
    padded = torch.nn.functional.pad(lse, (0, -rows % 32), value=float("inf"))
    o, do = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (o, do))
    rng = torch.empty((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward.default(
        do, q, k, v, None, o, padded, rng, rng, 0.0, [True, True, True, False], is_causal, scale=scale)
    return dq, dk, dv


def cudnn_attention_lse(q, k, v, is_causal: bool, scale: float | None):
    """CUDA cuDNN attention (``aten._scaled_dot_product_cudnn_attention``): o and lse."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention.default(q, k, v, None, True, 0.0, is_causal, False,
                                                                     scale=scale)
    return out[0], out[1].squeeze(-1).contiguous()


def cudnn_attention_lse_backward(do, q, k, v, o, lse, is_causal: bool, scale: float | None):
    """dq, dk, dv by ``aten._scaled_dot_product_cudnn_attention_backward`` (lse as [B, N, L, 1])."""
    rng = torch.empty((), dtype=torch.int64, device=q.device)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward.default(
        do, q, k, v, o, lse.contiguous().unsqueeze(-1), rng, rng, None, None, None, q.size(2), k.size(2), 0.0, is_causal,
        scale=scale)


def cpu_flash_attention_lse(q, k, v, is_causal: bool, scale: float | None):
    """CPU flash attention (``aten._scaled_dot_product_flash_attention_for_cpu``): o and lse."""
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v, 0.0, is_causal,
                                                                                scale=scale)
    return o, lse.float().contiguous()


def cpu_flash_attention_lse_backward(do, q, k, v, o, lse, is_causal: bool, scale: float | None):
    """dq, dk, dv by ``aten._scaled_dot_product_flash_attention_for_cpu_backward``."""
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
        do, q, k, v, o, lse, 0.0, is_causal, scale=scale)
