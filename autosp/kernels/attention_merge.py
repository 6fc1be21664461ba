"""Log-sum-exp merge of two partial attentions: the combining step of chunked attention.

    o, lse = merge_attention(o1, lse1, o2, lse2)      # o*: [..., L, H], lse*: [..., L] float32

Chunked attention (FPDT, issue 4 item 4) runs a query chunk against one key chunk at a time
and folds each partial result into the running one: with ``m = max(lse1, lse2)``,
``w_i = exp(lse_i - m)``, the merged output is ``(w1 o1 + w2 o2) / (w1 + w2)`` and the merged
log-sum-exp ``m + log(w1 + w2)``, which is exactly the attention over both key chunks (the
softmax normalisers add). One Triton program merges a block of rows, reading each input once
(float32 arithmetic, the output in the inputs' dtype); ``reference.merge_attention`` is the
same math in plain torch, used on devices without Triton and by the tests (under
``TRITON_INTERPRET=1`` on CPU). Forward only: chunked attention's backward recomputes each
chunk against the final log-sum-exp and never differentiates the merge.

Called by ``kernels.chunked_attention`` (pass ``chunk_attention``) for each key chunk it folds in.
Legend: R rows (batch x heads x queries), H head dim.
"""

from __future__ import annotations

import torch

from autosp.kernels import reference

try:
    import triton
    import triton.language as tl
except ImportError:  # a platform without Triton: the reference runs
    triton = None

if triton is not None:

    @triton.jit
    def _merge_kernel(
        o1_ptr, lse1_ptr, o2_ptr, lse2_ptr,  # inputs: [R, H] rows (stride H) and [R] float32
        o_ptr, lse_ptr,  # outputs, same layouts
        R, H,  # rows, head dim
        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,  # rows per program; H padded to a power of 2
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_H)
        row_ok = rows < R
        mask = row_ok[:, None] & (cols < H)[None, :]
        lse1 = tl.load(lse1_ptr + rows, mask=row_ok, other=float("-inf"))
        lse2 = tl.load(lse2_ptr + rows, mask=row_ok, other=float("-inf"))
        m = tl.maximum(lse1, lse2)
        safe_m = tl.where(m == float("-inf"), 0.0, m)
        w1 = tl.exp(lse1 - safe_m)
        w2 = tl.exp(lse2 - safe_m)
        total = w1 + w2
        inv = tl.where(total > 0, 1.0 / total, 0.0)
        offs = rows[:, None] * H + cols[None, :]
        o1 = tl.load(o1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o2 = tl.load(o2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o = o1 * (w1 * inv)[:, None] + o2 * (w2 * inv)[:, None]
        tl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=mask)
        lse = tl.where(total > 0, safe_m + tl.log(total), float("-inf"))
        tl.store(lse_ptr + rows, lse, mask=row_ok)


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor,
                    use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions (see the module docstring). ``use_triton=None``: Triton on
    CUDA tensors when it is installed, the reference otherwise."""
    if o1.shape != o2.shape or lse1.shape != lse2.shape or o1.shape[:-1] != lse1.shape:
        raise ValueError(f"merge_attention: outputs {list(o1.shape)} and {list(o2.shape)}, "
                         f"log-sum-exps {list(lse1.shape)} and {list(lse2.shape)} do not match")
    if o1.dtype != o2.dtype or lse1.dtype != torch.float32 or lse2.dtype != torch.float32:
        raise ValueError(f"merge_attention: outputs must share a dtype ({o1.dtype}, {o2.dtype}) and log-sum-exps "
                         f"be float32 ({lse1.dtype}, {lse2.dtype})")
    head = o1.shape[-1]
    o1_RH, o2_RH = o1.reshape(-1, head).contiguous(), o2.reshape(-1, head).contiguous()
    lse1_R, lse2_R = lse1.reshape(-1).contiguous(), lse2.reshape(-1).contiguous()
    if use_triton is None:
        use_triton = triton is not None and o1.is_cuda
    if not use_triton:
        o_RH, lse_R = reference.merge_attention(o1_RH, lse1_R, o2_RH, lse2_R)
        return o_RH.view(o1.shape), lse_R.view(lse1.shape)
    if triton is None:
        raise RuntimeError("merge_attention: use_triton=True but Triton is not installed")
    rows = o1_RH.shape[0]
    o_RH, lse_R = torch.empty_like(o1_RH), torch.empty_like(lse1_R)
    block_r = 32
    _merge_kernel[(triton.cdiv(rows, block_r),)](o1_RH, lse1_R, o2_RH, lse2_R, o_RH, lse_R, rows, head,
                                                BLOCK_R=block_r, BLOCK_H=triton.next_power_of_2(head))
    return o_RH.view(o1.shape), lse_R.view(lse1.shape)
