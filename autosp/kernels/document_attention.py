"""Document-causal attention over packed sequences: causal attention inside each document of a
row, nothing across documents, optionally inside a sliding window.

    o_BHSD = document_attention(q_BHSD, k_BHSD, v_BHSD, doc_BS, scale=None, window=None, softcap=None)
    o_BHSD, lse_BHS = torch.ops.autosp.document_attention(q_BHSD, k_BHSD, v_BHSD, doc_BS, scale, window, softcap,
                                                          use_triton)

Query i of row b sees key j when ``j <= i and doc[b, j] == doc[b, i] and i - j < window``;
``doc=None`` is one document a row, ``window=None`` no window (``window`` counts the keys a
query may see, its own included: transformers' ``sliding_window``). With ``scale=None`` meaning
``D ** -0.5`` the output equals ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
scale=scale)`` for that mask (``document_mask``). Precondition (the caller's, not checked on the
reference path): ``doc`` (int64 or int32) is nondecreasing along S in every row, so each
document is one run of positions (a cumsum of document-start flags is). Every query sees at
least its own key, so no row is empty. ``o`` comes back contiguous in q's dtype, ``lse``
(natural log-sum-exp of the scaled scores, float32, contiguous) as the op's second output,
marked non-differentiable; the plain function returns ``o`` alone. Dtypes: float16, bfloat16,
float32. Grouped-query attention: k and v may have H / G heads, query head h reading KV head
h // G (as SDPA's ``enable_gqa``); dk and dv sum over each KV head's G query heads, and KV is
never repeated. ``softcap=c`` bounds the scores first (Gemma 2's logit softcap): query i weighs
key j by ``exp(c tanh(scale q_i . k_j / c))``, as ``softcap_attention`` (autosp/kernels/
softcap_attention.py) does with that mask; lse is then of the bounded scores.

Under the precondition, with ``start[b, i]`` the first key query i sees (its document's first
position, or ``i - window + 1`` if later) and ``end[b, j]`` the last query that sees key j (its
document's last position, or ``j + window - 1`` if earlier), key j is visible to query i exactly
when ``start[b, i] <= j <= i``, equivalently ``j <= i <= end[b, j]``. Both tables are
nondecreasing; the kernels take them as int32 ``[B, S]`` (``document_bounds``, made in torch
from ``doc`` and ``window``) and never read ``doc`` itself. Block skipping (BLOCK_M query rows,
BLOCK_N key rows per tile):

    forward, dq   query block [m0, m0 + BLOCK_M) visits key blocks from start[b, m0] rounded down
                  to BLOCK_N up to its last query (start is nondecreasing, so start[b, m0] is the
                  block's smallest)
    dk, dv        key block [n0, n0 + BLOCK_N) visits query blocks from n0 (rounded down to
                  BLOCK_M) up to end[b, last key of the block]

and masks a visited tile with the rule above (and ``< S``) unless every key of the tile is
visible to every query of it (the interior: no mask computed). Work is about the sum over
documents of length^2 / 2, or length x window under a window (plus one tile row or column per
block at the edges), not S^2 / 2; memory is O(S D), never a score matrix.

What runs where. CUDA tensors with Triton installed and D a power of two in [16, 256]: three
Triton kernels (autosp/kernels/document_attention_triton.py), flash-attention style. The forward keeps a running max and sum per query in
float32 (``exp2`` on scores pre-multiplied by log2(e)) and saves lse. The backward computes
``delta = rowsum(o * do)`` in torch, then a dk/dv kernel (one program per key block of a KV
head, looping over its G query heads; float32 accumulators) and a dq kernel (one program per
query block); no atomics, so deterministic. With a softcap every kernel bounds each tile's
scores as it makes them (tanh through exp2) and the backward multiplies the score gradient by
``1 - tanh^2``, recomputed from the tile: no extra memory, two more float32 ops a score. Tiles
and warps per kernel and head dim: ``_launch_config`` (64 x 64 tiles, 4 warps for D <= 64; measured
on an H200). Products run in the inputs' dtype with float32 accumulation (float32 inputs in
full ``ieee`` precision, not tf32); probabilities and score gradients are rounded to the inputs'
dtype before their products, as in FlashAttention-2. q, k, v and do may have any strides except along D, which must be 1 (else a
contiguous copy is made); a precondition check (nondecreasing ``doc``) runs on the stream
without a host sync. Elsewhere (CPU, no Triton, other D) the reference runs:
``document_attention_reference``, the dense masked attention in float32 with a ``[B, H, S, S]``
score matrix (exact in float32; its memory grows as S^2), and its backward by the explicit
formulas from the saved lse. ``use_triton=True`` forces the kernels; on CPU tensors that works
only under ``TRITON_INTERPRET=1`` (how the tests run them).

The op and its backward (``autosp::document_attention_backward``) are ``torch.library`` custom
ops with fake implementations and a registered autograd formula, so AOTAutograd and Inductor see
two opaque calls. Legend: B batch, H heads, S sequence (packed documents), D head dim.
"""

from __future__ import annotations

import math

import torch

from autosp import _torch_private as tp

try:
    import triton

    from autosp.kernels import document_attention_triton as _triton
except ImportError:  # a platform without Triton: the reference runs
    triton = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = math.log2(math.e)


# --- reference (plain torch; the CPU path and the tests' truth) ---------------------------------


def document_mask(doc_BS: torch.Tensor | None, window: int | None = None, *, batch: int = 1, seq: int | None = None,
                  device=None) -> torch.Tensor:
    """``[B, S, S]`` bool: ``mask[b, i, j] = (j <= i) & (doc[b, i] == doc[b, j]) & (i - j < window)``
    (needs no precondition); without ``doc`` the ``batch``, ``seq`` and ``device`` given, one
    document a row; without ``window`` no window."""
    if doc_BS is not None:
        batch, seq, device = doc_BS.shape[0], doc_BS.shape[1], doc_BS.device
    pos_S = torch.arange(seq, device=device)
    mask_SS = pos_S[None, :] <= pos_S[:, None]
    if window is not None:
        mask_SS = mask_SS & (pos_S[:, None] - pos_S[None, :] < window)
    if doc_BS is None:
        return mask_SS.expand(batch, seq, seq)
    return mask_SS & (doc_BS[:, :, None] == doc_BS[:, None, :])


def _repeat_kv(x_BhSD: torch.Tensor, heads: int) -> torch.Tensor:
    """KV heads repeated to the ``heads`` query heads (query head h reads KV head h // group), float32."""
    return x_BhSD.float().repeat_interleave(heads // x_BhSD.shape[1], dim=1)


def _sum_groups(dx_BHSD: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gradient of repeated KV summed over each KV head's group of query heads."""
    b, heads, seq, dim = dx_BHSD.shape
    return dx_BHSD.view(b, kv_heads, heads // kv_heads, seq, dim).sum(2)


def _scores(q_BHSD, k_BhSD, scale: float, softcap: float | None) -> torch.Tensor:
    """Scaled float32 scores ``[B, H, S, S]``, bounded by ``softcap * tanh(s / softcap)`` if given."""
    s_BHSS = (q_BHSD.float() @ _repeat_kv(k_BhSD, q_BHSD.shape[1]).transpose(-1, -2)) * scale
    return s_BHSS if softcap is None else torch.tanh(s_BHSS / softcap) * softcap


def _masked(s_BHSS: torch.Tensor, doc_BS, window) -> torch.Tensor:
    """The scores with invisible keys at -inf."""
    b, _, seq, _ = s_BHSS.shape
    mask_BSS = document_mask(doc_BS, window, batch=b, seq=seq, device=s_BHSS.device)
    return s_BHSS.masked_fill(~mask_BSS[:, None], float("-inf"))


def document_attention_reference(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
                                 doc_BS: torch.Tensor | None, scale: float | None = None, window: int | None = None,
                                 softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention in float32: ``o`` in q's dtype and the natural ``lse`` (float32)."""
    scale = _scale(q_BHSD, scale)
    s_BHSS = _masked(_scores(q_BHSD, k_BHSD, scale, softcap), doc_BS, window)
    lse_BHS = torch.logsumexp(s_BHSS, dim=-1)  # finite: every query sees its own key
    o_BHSD = torch.exp(s_BHSS - lse_BHS[..., None]) @ _repeat_kv(v_BHSD, q_BHSD.shape[1])
    return o_BHSD.to(q_BHSD.dtype), lse_BHS


def document_attention_reference_backward(do_BHSD, q_BHSD, k_BHSD, v_BHSD, o_BHSD, lse_BHS, doc_BS, scale: float,
                                          window: int | None = None, softcap: float | None = None
                                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of ``document_attention_reference`` (explicit formulas, float32, P from the saved
    lse; with a softcap the score gradient times the bound's derivative ``1 - (t / softcap)^2``)."""
    heads, kv_heads = q_BHSD.shape[1], k_BHSD.shape[1]
    do_f = do_BHSD.float()
    t_BHSS = _scores(q_BHSD, k_BHSD, scale, softcap)
    p_BHSS = torch.exp(_masked(t_BHSS, doc_BS, window) - lse_BHS[..., None])
    dv_BHSD = _sum_groups(p_BHSS.transpose(-1, -2) @ do_f, kv_heads)
    delta_BHS = (do_f * o_BHSD.float()).sum(-1)
    ds_BHSS = p_BHSS * (do_f @ _repeat_kv(v_BHSD, heads).transpose(-1, -2) - delta_BHS[..., None]) * scale
    if softcap is not None:
        ds_BHSS = ds_BHSS * (1 - (t_BHSS / softcap) ** 2)
    dq_BHSD = ds_BHSS @ _repeat_kv(k_BHSD, heads)
    dk_BHSD = _sum_groups(ds_BHSS.transpose(-1, -2) @ q_BHSD.float(), kv_heads)
    return dq_BHSD.to(q_BHSD.dtype), dk_BHSD.to(k_BHSD.dtype), dv_BHSD.to(v_BHSD.dtype)


# --- launchers ------------------------------------------------------------------------------------


def _scale(q_BHSD, scale: float | None) -> float:
    return q_BHSD.shape[-1] ** -0.5 if scale is None else scale


def document_bounds(doc_BS: torch.Tensor | None, window: int | None = None, *, batch: int = 1,
                    seq: int | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start_BS, end_BS)`` int32, contiguous: the first key each position sees as a query and the
    last query that sees it as a key. Without a window: the first and last position of the
    document (run of equal ids) holding it; with one they are clamped to ``i - window + 1`` and
    ``j + window - 1`` (both tables stay nondecreasing). Without ``doc``: one document a row of
    ``seq`` positions (``batch`` rows on ``device``)."""
    if doc_BS is not None:
        batch, seq, device = doc_BS.shape[0], doc_BS.shape[1], doc_BS.device
    pos_S = torch.arange(seq, device=device)
    if doc_BS is None:
        start_BS, end_BS = torch.zeros_like(pos_S).expand(batch, seq), torch.full_like(pos_S, seq - 1).expand(batch, seq)
    else:
        is_start_BS = torch.ones(batch, seq, dtype=torch.bool, device=device)
        is_start_BS[:, 1:] = doc_BS[:, 1:] != doc_BS[:, :-1]
        is_end_BS = torch.ones_like(is_start_BS)
        is_end_BS[:, :-1] = is_start_BS[:, 1:]
        start_BS = torch.where(is_start_BS, pos_S, 0).cummax(dim=1).values
        end_BS = torch.where(is_end_BS, pos_S, seq).flip(1).cummin(dim=1).values.flip(1)
    if window is not None:
        start_BS = torch.maximum(start_BS, pos_S - (window - 1))
        end_BS = torch.minimum(end_BS, pos_S + (window - 1))
    return start_BS.to(torch.int32).contiguous(), end_BS.to(torch.int32).contiguous()


def triton_supports(q_BHSD: torch.Tensor) -> bool:
    """Whether the kernels take this head dim: a power of two in [16, 256]."""
    dim = q_BHSD.shape[-1]
    return 16 <= dim <= 256 and dim & (dim - 1) == 0


def _launch_config(kernel: str, dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options of ``kernel`` ("forward", "dkdv", "dq"), picked on an H200 (bf16,
    B=1, H=16, S=16384, one document; Triton 3.6): 4 warps beat 8 at D = 64 and 128, and the backward
    at D = 128 prefers 32-row strips on the side it loops over (11.4 against 15.4 ms for dk/dv with
    64 x 64 tiles and 8 warps). D = 256 or float32 from D = 128 (twice the registers a tile): smaller
    tiles, 8 warps, 2 stages (checked for correctness only)."""
    if dim >= 256 or (dtype == torch.float32 and dim >= 128):
        tiles = (64, 32, 8, 2)
    elif dim <= 64:
        tiles = (64, 64, 4, 3)
    else:
        tiles = {"forward": (64, 64, 4, 3), "dkdv": (32, 64, 4, 4), "dq": (64, 32, 4, 4)}[kernel]
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), tiles, strict=True))


_INT32_MAX = 2**31 - 1


def _unit_d(x_BHSD: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its D stride is 1 and every offset inside one (b, h) slice fits int32
    (the kernels compute those in int32; the (b, h) base in int64), else a contiguous copy; an
    error when even that does not fit (S * D above 2**31)."""
    seq, dim = x_BHSD.shape[2], x_BHSD.shape[3]
    if x_BHSD.stride(-1) == 1 and (seq - 1) * x_BHSD.stride(2) + dim <= _INT32_MAX:
        return x_BHSD
    if seq * dim > _INT32_MAX:
        raise ValueError(f"document_attention: S * D = {seq} * {dim} is past the kernels' int32 offsets inside a head")
    return x_BHSD.contiguous()


def _strides(x_BHSD: torch.Tensor) -> tuple[int, int, int]:
    return x_BHSD.stride(0), x_BHSD.stride(1), x_BHSD.stride(2)


def _config(kernel: str, q_BHSD, block: tuple[int, int] | None) -> dict:
    config = _launch_config(kernel, q_BHSD.shape[-1], q_BHSD.dtype)
    if block is not None:  # tests: small tiles, default launch options
        config = {"BLOCK_M": block[0], "BLOCK_N": block[1]}
    config["PRECISION"] = "ieee" if q_BHSD.dtype == torch.float32 else "tf32"  # tf32 is unused for 16-bit
    return config


@torch.library.custom_op("autosp::check_positions", mutates_args=())
def _check_positions(positions: torch.Tensor, limit: int) -> None:
    """Fail the stream (no host sync) unless every position lies strictly between -limit and limit:
    pass ``document_mask`` puts this call in the graph where its proof read windows or an order
    from ``positions`` (inside a document positions step by one; no step may wrap around int64).
    A custom op with a side effect, so that every compiler keeps it and runs it as it is."""
    ok = ((positions > -limit) & (positions < limit)).all()
    tp.assert_async(ok, f"autosp: position_ids must lie strictly between -{limit} and {limit} (pass document_mask "
                        "proved the model's attention mask under that assumption)")


@_check_positions.register_fake
def _(positions, limit):
    return None


check_positions = tp.has_side_effect(torch.ops.autosp.check_positions.default)


def _check_nondecreasing(doc_BS: torch.Tensor | None) -> None:
    if doc_BS is not None:
        tp.assert_async((doc_BS[:, 1:] >= doc_BS[:, :-1]).all(),
                        "document_attention: doc must be nondecreasing along S in every row")


def _bounds(q_BHSD, doc_BS, window) -> tuple[torch.Tensor, torch.Tensor]:
    return document_bounds(doc_BS, window, batch=q_BHSD.shape[0], seq=q_BHSD.shape[2], device=q_BHSD.device)


def _softcap_args(softcap: float | None) -> dict:
    """The kernels' softcap arguments: the bound in base 2 (1.0, unread, without one) and the flag."""
    return {"softcap2": 1.0 if softcap is None else softcap * _LOG2E, "SOFTCAP": softcap is not None}


def _forward_triton(q_BHSD, k_BHSD, v_BHSD, doc_BS, scale: float, window: int | None = None,
                    softcap: float | None = None, block: tuple[int, int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel's launcher: (o_BHSD contiguous in q's dtype, lse_BHS float32)."""
    b, heads, seq, dim = q_BHSD.shape
    q_BHSD, k_BHSD, v_BHSD = _unit_d(q_BHSD), _unit_d(k_BHSD), _unit_d(v_BHSD)
    _check_nondecreasing(doc_BS)
    start_BS, _ = _bounds(q_BHSD, doc_BS, window)
    o_BHSD = torch.empty((b, heads, seq, dim), dtype=q_BHSD.dtype, device=q_BHSD.device)
    lse_BHS = torch.empty((b, heads, seq), dtype=torch.float32, device=q_BHSD.device)
    config = _config("forward", q_BHSD, block)
    grid = (triton.cdiv(seq, config["BLOCK_M"]), b * heads)
    _triton.forward_kernel[grid](q_BHSD, k_BHSD, v_BHSD, o_BHSD, lse_BHS, start_BS, *_strides(q_BHSD), *_strides(k_BHSD),
                          *_strides(v_BHSD), heads, seq, heads // k_BHSD.shape[1], scale * _LOG2E, D=dim,
                          **_softcap_args(softcap), **config)
    return o_BHSD, lse_BHS


def _backward_triton(do_BHSD, q_BHSD, k_BHSD, v_BHSD, o_BHSD, lse_BHS, doc_BS, scale: float,
                     window: int | None = None, softcap: float | None = None, block: tuple[int, int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernels' launcher: dq, dk, dv, contiguous, in the inputs' dtypes."""
    b, heads, seq, dim = q_BHSD.shape
    do_BHSD, q_BHSD, k_BHSD, v_BHSD = (_unit_d(x) for x in (do_BHSD, q_BHSD, k_BHSD, v_BHSD))
    delta_BHS = (o_BHSD.float() * do_BHSD.float()).sum(-1).contiguous()
    lse_BHS = lse_BHS.contiguous()
    start_BS, end_BS = _bounds(q_BHSD, doc_BS, window)
    dq_BHSD = torch.empty((b, heads, seq, dim), dtype=q_BHSD.dtype, device=q_BHSD.device)
    kv_heads = k_BHSD.shape[1]
    dk_BHSD = torch.empty((b, kv_heads, seq, dim), dtype=k_BHSD.dtype, device=q_BHSD.device)
    dv_BHSD = torch.empty((b, kv_heads, seq, dim), dtype=v_BHSD.dtype, device=q_BHSD.device)
    strides = (*_strides(q_BHSD), *_strides(k_BHSD), *_strides(v_BHSD), *_strides(do_BHSD))
    config = _config("dkdv", q_BHSD, block)
    _triton.backward_dkdv_kernel[(triton.cdiv(seq, config["BLOCK_N"]), b * kv_heads)](
        q_BHSD, k_BHSD, v_BHSD, do_BHSD, lse_BHS, delta_BHS, dk_BHSD, dv_BHSD, end_BS, *strides, heads, seq,
        heads // kv_heads, scale * _LOG2E, scale, D=dim, **_softcap_args(softcap), **config)
    config = _config("dq", q_BHSD, block)
    _triton.backward_dq_kernel[(triton.cdiv(seq, config["BLOCK_M"]), b * heads)](
        q_BHSD, k_BHSD, v_BHSD, do_BHSD, lse_BHS, delta_BHS, dq_BHSD, start_BS, *strides, heads, seq,
        heads // kv_heads, scale * _LOG2E, scale, D=dim, **_softcap_args(softcap), **config)
    return dq_BHSD, dk_BHSD, dv_BHSD


def _pick_triton(q_BHSD, use_triton: bool | None) -> bool:
    if use_triton is None:
        return triton is not None and q_BHSD.is_cuda and triton_supports(q_BHSD)
    if use_triton and (triton is None or not triton_supports(q_BHSD)):
        raise RuntimeError(f"document_attention: use_triton=True needs Triton (installed: {triton is not None}) "
                           f"and a power-of-two head dim in [16, 256] (got {q_BHSD.shape[-1]})")
    return use_triton


# --- the custom ops -------------------------------------------------------------------------------


def _check(q_BHSD, k_BHSD, v_BHSD, doc_BS, window, softcap) -> None:
    name = "document_attention"
    if q_BHSD.dim() != 4 or k_BHSD.dim() != 4 or v_BHSD.shape != k_BHSD.shape \
            or k_BHSD.shape[::2] != q_BHSD.shape[::2] or k_BHSD.shape[-1] != q_BHSD.shape[-1] \
            or k_BHSD.shape[1] < 1 or q_BHSD.shape[1] % k_BHSD.shape[1]:
        raise ValueError(f"{name}: q must be [B, H, S, D] and k, v [B, H / G, S, D] of one shape (G query heads "
                         f"a KV head), got {list(q_BHSD.shape)}, {list(k_BHSD.shape)}, {list(v_BHSD.shape)}")
    if not (q_BHSD.dtype == k_BHSD.dtype == v_BHSD.dtype) or q_BHSD.dtype not in _DTYPES:
        raise ValueError(f"{name}: q, k, v must share one of {_DTYPES}, got {q_BHSD.dtype}, {k_BHSD.dtype}, "
                         f"{v_BHSD.dtype}")
    if doc_BS is not None and (doc_BS.shape != (q_BHSD.shape[0], q_BHSD.shape[2])
                               or doc_BS.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"{name}: doc must be int32/int64 [B, S] = {[q_BHSD.shape[0], q_BHSD.shape[2]]}, "
                         f"got {doc_BS.dtype} {list(doc_BS.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"{name}: window must be at least 1 (a query sees its own key), got {window}")
    if softcap is not None and not (0 < softcap < math.inf):
        raise ValueError(f"{name}: softcap must be positive and finite, got {softcap}")
    if q_BHSD.shape[2] < 1:
        raise ValueError(f"{name}: empty sequence (S = 0)")
    if not (q_BHSD.device == k_BHSD.device == v_BHSD.device) or (doc_BS is not None and doc_BS.device != q_BHSD.device):
        raise ValueError(f"{name}: q, k, v, doc on different devices")


@torch.library.custom_op("autosp::document_attention", mutates_args=())
def document_attention_lse(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
                           doc_BS: torch.Tensor | None, scale: float | None = None, window: int | None = None,
                           softcap: float | None = None, use_triton: bool | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Document-causal attention: (o_BHSD contiguous in q's dtype, lse_BHS float32, not
    differentiable). ``doc=None``: one document a row; ``window``: a query sees at most that many
    keys, its own included; ``softcap``: scores bounded by ``softcap * tanh(s / softcap)``.
    ``use_triton=None``: the kernels on CUDA when they apply, else the reference."""
    _check(q_BHSD, k_BHSD, v_BHSD, doc_BS, window, softcap)
    scale = _scale(q_BHSD, scale)
    if _pick_triton(q_BHSD, use_triton):
        return _forward_triton(q_BHSD, k_BHSD, v_BHSD, doc_BS, scale, window, softcap)
    return document_attention_reference(q_BHSD, k_BHSD, v_BHSD, doc_BS, scale, window, softcap)


@document_attention_lse.register_fake
def _(q_BHSD, k_BHSD, v_BHSD, doc_BS, scale=None, window=None, softcap=None, use_triton=None):
    _check(q_BHSD, k_BHSD, v_BHSD, doc_BS, window, softcap)
    return q_BHSD.new_empty(q_BHSD.shape), q_BHSD.new_empty(q_BHSD.shape[:3], dtype=torch.float32)


@torch.library.custom_op("autosp::document_attention_backward", mutates_args=())
def document_attention_backward(do_BHSD: torch.Tensor, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor,
                                v_BHSD: torch.Tensor, o_BHSD: torch.Tensor, lse_BHS: torch.Tensor,
                                doc_BS: torch.Tensor | None, scale: float, window: int | None = None,
                                softcap: float | None = None, use_triton: bool | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, in the inputs' dtypes) of ``autosp::document_attention`` from its
    saved inputs, output and lse and the incoming gradient of o."""
    if _pick_triton(q_BHSD, use_triton):
        return _backward_triton(do_BHSD, q_BHSD, k_BHSD, v_BHSD, o_BHSD, lse_BHS, doc_BS, scale, window, softcap)
    return document_attention_reference_backward(do_BHSD, q_BHSD, k_BHSD, v_BHSD, o_BHSD, lse_BHS, doc_BS, scale,
                                                 window, softcap)


@document_attention_backward.register_fake
def _(do_BHSD, q_BHSD, k_BHSD, v_BHSD, o_BHSD, lse_BHS, doc_BS, scale, window=None, softcap=None, use_triton=None):
    return q_BHSD.new_empty(q_BHSD.shape), k_BHSD.new_empty(k_BHSD.shape), v_BHSD.new_empty(v_BHSD.shape)


def _setup_context(ctx, inputs, output):
    q_BHSD, k_BHSD, v_BHSD, doc_BS, scale, window, softcap, use_triton = inputs
    o_BHSD, lse_BHS = output
    ctx.mark_non_differentiable(lse_BHS)
    ctx.options = (_scale(q_BHSD, scale), window, softcap, use_triton)
    ctx.save_for_backward(q_BHSD, k_BHSD, v_BHSD, o_BHSD, lse_BHS, doc_BS)


def _backward(ctx, do_BHSD, _d_lse):
    scale, window, softcap, use_triton = ctx.options
    q_BHSD, k_BHSD, v_BHSD, o_BHSD, lse_BHS, doc_BS = ctx.saved_tensors
    dq, dk, dv = document_attention_backward(do_BHSD, q_BHSD, k_BHSD, v_BHSD, o_BHSD, lse_BHS, doc_BS, scale, window,
                                             softcap, use_triton)
    return dq, dk, dv, None, None, None, None, None


document_attention_lse.register_autograd(_backward, setup_context=_setup_context)
DOCUMENT_ATTENTION = torch.ops.autosp.document_attention.default


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor | None,
                       scale: float | None = None, window: int | None = None, softcap: float | None = None
                       ) -> torch.Tensor:
    """Document-causal attention's output alone (differentiable in q, k, v); see the module docstring."""
    return torch.ops.autosp.document_attention(q, k, v, doc, scale, window, softcap)[0]
