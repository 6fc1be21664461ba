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


# --- chunked attention (autosp/kernels/chunked_attention.py) --------------------------------------
# Legend: B batch, N query heads, n key/value heads (query head h reads kv head h // (N // n)),
# G = N // n, L query rows, M key rows, H head dim.


def _grouped_scores(q_BNLH: torch.Tensor, k_BnMH: torch.Tensor, is_causal: bool, scale: float
                    ) -> torch.Tensor:
    """Scaled scores [B, n, G, L, M] in the computation dtype (float64 stays, else float32), keys
    above the top-left diagonal masked with -inf when causal; no repeated key/value heads."""
    b, heads, rows, dim = q_BNLH.shape
    kv_heads, cols = k_BnMH.shape[1], k_BnMH.shape[2]
    acc = torch.float64 if q_BNLH.dtype == torch.float64 else torch.float32
    q_BnGLH = q_BNLH.to(acc).reshape(b, kv_heads, heads // kv_heads, rows, dim)
    s_BnGLM = (q_BnGLH @ k_BnMH.to(acc)[:, :, None].transpose(-1, -2)) * scale
    if is_causal:
        hidden_LM = torch.ones(rows, cols, dtype=torch.bool, device=s_BnGLM.device).triu(1)
        s_BnGLM = s_BnGLM.masked_fill(hidden_LM, float("-inf"))
    return s_BnGLM


def attention_lse(q_BNLH: torch.Tensor, k_BnMH: torch.Tensor, v_BnMH: torch.Tensor, is_causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention and its natural log-sum-exp: o [B, N, L, H] in q's dtype, lse [B, N, L]
    float32 (arithmetic in float32, float64 for float64 inputs). Causal masks key j > query i
    (top-left, as ``F.scaled_dot_product_attention``); a row with no key gets o = 0, lse = -inf.
    Over the whole sequence this is the reference of ``autosp::chunked_attention``."""
    s_BnGLM = _grouped_scores(q_BNLH, k_BnMH, is_causal, scale)
    lse_BnGL = torch.logsumexp(s_BnGLM, dim=-1)
    p_BnGLM = torch.exp(s_BnGLM - lse_BnGL.nan_to_num(neginf=0.0)[..., None])
    o_BnGLH = p_BnGLM @ v_BnMH.to(s_BnGLM.dtype)[:, :, None]
    return o_BnGLH.flatten(1, 2).to(q_BNLH.dtype), lse_BnGL.flatten(1, 2).float()


def attention_lse_backward(do_BNLH: torch.Tensor, q_BNLH: torch.Tensor, k_BnMH: torch.Tensor,
                           v_BnMH: torch.Tensor, o_BNLH: torch.Tensor, lse_BNL: torch.Tensor, is_causal: bool,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of ``attention_lse`` given its output ``o`` and ``lse``, or those of attention
    over a larger key set that contains these keys (then P = exp(s - lse) and D = rowsum(do * o)
    are that attention's, and the results are this key chunk's share of its gradients)."""
    s_BnGLM = _grouped_scores(q_BNLH, k_BnMH, is_causal, scale)
    acc = s_BnGLM.dtype
    b, heads, rows, dim = q_BNLH.shape
    kv_heads = k_BnMH.shape[1]

    def grouped(x):
        return x.to(acc).reshape(b, kv_heads, heads // kv_heads, *x.shape[2:])

    p_BnGLM = torch.exp(s_BnGLM - grouped(lse_BNL).nan_to_num(neginf=0.0)[..., None])
    do_BnGLH = grouped(do_BNLH)
    dv_BnMH = (p_BnGLM.transpose(-1, -2) @ do_BnGLH).sum(2)
    dp_BnGLM = do_BnGLH @ v_BnMH.to(acc)[:, :, None].transpose(-1, -2)
    d_BnGL = (do_BnGLH * grouped(o_BNLH)).sum(-1)
    ds_BnGLM = p_BnGLM * (dp_BnGLM - d_BnGL[..., None]) * scale
    dq_BnGLH = ds_BnGLM @ k_BnMH.to(acc)[:, :, None]
    dk_BnMH = (ds_BnGLM.transpose(-1, -2) @ grouped(q_BNLH)).sum(2)
    return dq_BnGLH.flatten(1, 2).to(q_BNLH.dtype), dk_BnMH.to(k_BnMH.dtype), dv_BnMH.to(v_BnMH.dtype)


def chunked_attention(q_BNSH: torch.Tensor, k_BnSH: torch.Tensor, v_BnSH: torch.Tensor, is_causal: bool,
                      scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``autosp::chunked_attention`` computes, for any number of chunks: exact attention over
    the whole sequence and its natural log-sum-exp (float32); ``scale`` defaults to H ** -0.5."""
    scale = q_BNSH.shape[-1] ** -0.5 if scale is None else scale
    return attention_lse(q_BNSH, k_BnSH, v_BnSH, is_causal, scale)
