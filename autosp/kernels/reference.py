"""Plain-torch references of autosp's kernels, shared by the ops that fall back to them, the
tests and the benchmarks. Legend: N rows (tokens), D hidden, V vocabulary, C chunk rows."""

from __future__ import annotations

import torch


def linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, target_N: torch.Tensor, ignore_index: int,
                         chunk: int, upcast: bool, with_grads: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cross_entropy(h @ w.T, target, reduction="sum")`` and its gradients in ``h`` and ``w``
    (empty tensors without ``with_grads``), over chunks of ``chunk`` rows (see
    autosp/kernels/linear_cross_entropy.py for the contract)."""
    n = h_ND.shape[0]
    loss = torch.zeros((), dtype=torch.float32, device=h_ND.device)
    grad_h_ND = torch.empty_like(h_ND) if with_grads else None
    grad_w_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if with_grads else None
    for start in range(0, n, chunk):
        h_CD = h_ND[start:start + chunk]
        t_C = target_N[start:start + chunk]
        logits_CV = h_CD @ w_VD.t()
        if upcast:
            logits_CV = logits_CV.float()
        valid_C = t_C != ignore_index
        safe_t_C = torch.where(valid_C, t_C, 0)
        lse_C = torch.logsumexp(logits_CV.float(), dim=-1)
        picked_C = logits_CV.gather(1, safe_t_C[:, None]).squeeze(1).float()
        loss += torch.where(valid_C, lse_C - picked_C, 0.0).sum()
        if not with_grads:
            continue
        # d loss / d logits = softmax - onehot on valid rows, 0 on ignored ones; reuses the block.
        g_CV = logits_CV.float().sub_(lse_C[:, None]).exp_()
        g_CV.scatter_add_(1, safe_t_C[:, None], torch.full_like(lse_C[:, None], -1.0))
        g_CV.mul_(valid_C[:, None])
        g_CV = g_CV.to(h_ND.dtype)  # as autograd casts the gradient back through .float()
        grad_h_ND[start:start + chunk] = g_CV @ w_VD
        grad_w_VD += g_CV.t() @ h_CD  # in h's dtype (the GEMM accumulates in float32), summed in float32
        del logits_CV, g_CV
    if not with_grads:
        return loss, h_ND.new_empty((0,)), w_VD.new_empty((0,))
    return loss, grad_h_ND, grad_w_VD.to(w_VD.dtype)


def merge_attention(o1_RH: torch.Tensor, lse1_R: torch.Tensor, o2_RH: torch.Tensor, lse2_R: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two key sets from the attention over each: per row R, outputs
    ``o`` ``[R, H]`` weighted by ``exp(lse)`` (natural log-sum-exp of each part's scores, float32).
    A row whose two parts are both empty (``lse = -inf``) gets ``o = 0``, ``lse = -inf``."""
    m_R = torch.maximum(lse1_R, lse2_R)
    safe_m_R = torch.where(torch.isinf(m_R), 0.0, m_R)
    w1_R, w2_R = torch.exp(lse1_R - safe_m_R), torch.exp(lse2_R - safe_m_R)
    total_R = w1_R + w2_R
    lse_R = torch.where(total_R > 0, safe_m_R + torch.log(total_R), float("-inf"))
    inv_R = torch.where(total_R > 0, 1.0 / total_R, 0.0)
    o_RH = (o1_RH.float() * (w1_R * inv_R)[:, None] + o2_RH.float() * (w2_R * inv_R)[:, None]).to(o1_RH.dtype)
    return o_RH, lse_R
