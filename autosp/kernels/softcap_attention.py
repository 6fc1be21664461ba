"""Attention with a logit softcap (Gemma 2): SDPA's function with the scores bounded by
``softcap * tanh(scores / softcap)`` before the mask and the softmax.

    o_BNSH = softcap_attention(q_BNSH, k_BnSH, v_BnSH, attn_mask=None, dropout_p=0.0, is_causal=False,
                               scale=None, enable_gqa=False, softcap=50.0)

SDPA's signature (the same defaults: ``scale=None`` is ``H ** -0.5``, a boolean mask keeps where
True, a float mask is added) plus ``softcap``, so that the passes that move SDPA calls between
the all-to-alls, split them into head groups or prove their masks causal treat it as one
(``autosp.passes._attention.SDPA_TARGETS``). No SDPA kernel bounds the scores, so this one is
written in torch ops, as the model's own chain is: AOTAutograd traces through it and derives the
backward. Where the mask is causal, windowed or causal within documents, ``document_mask``
replaces the call by ``document_attention``, which bounds the scores in its tiles; what stays here
builds the scores, ``[B, N, S, S]`` in float32 (float64 for float64 inputs), for the heads the rank holds (under
sequence parallelism N/P of them over the whole sequence); arithmetic after the matmul is in
float32 (the chain rounds the scores to the inputs' dtype before bounding them: the same
function, fewer roundings). ``dropout_p`` must be 0 (``eager_attention`` rewrites no chain with
dropout in training).

Legend: B batch, N query heads, n key/value heads (query head h reads kv head h // (N/n)),
S sequence, H head dim.
"""

from __future__ import annotations

import torch


def softcap_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                      scale: float | None = None, enable_gqa: bool = False, *, softcap: float) -> torch.Tensor:
    """``softmax(softcap * tanh(q k^T * scale / softcap) + mask) v``, SDPA's conventions otherwise."""
    if dropout_p != 0.0:
        raise ValueError(f"softcap_attention takes no dropout (dropout_p={dropout_p})")
    if not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        group = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(group, dim=-3)
        value = value.repeat_interleave(group, dim=-3)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-2, -1))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale  # float64 stays float64
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        rows, cols = scores.shape[-2], scores.shape[-1]
        visible = torch.ones(rows, cols, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(weights, value)
