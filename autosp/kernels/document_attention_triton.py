"""The Triton kernels of ``autosp::document_attention`` (autosp/kernels/document_attention.py, whose
docstring says what they compute and how they skip blocks; its launchers call them): the
forward, the dK/dV backward (one program per key block of a KV head, over its query heads) and
the dQ backward. Imported only where Triton is installed.

Each kernel loops over the tiles its block visits in three runs: the masked tiles before the
interior, the interior (every key visible to every query: no mask, no bounds checks, the
MASKED=False copy of the tile step), the masked tiles after it. The tile steps are @triton.jit
helpers, inlined by Triton; MASKED is a constexpr, so each copy is compiled apart. SOFTCAP (a
constexpr too) bounds the scores first, ``s = c tanh(s / c)`` in base 2 (``softcap2`` is
``c * log2(e)``); the backward multiplies the score gradient by the bound's derivative
``1 - tanh^2``.
"""

import triton
import triton.language as tl


@triton.jit
def _interior(lo, hi, full_lo, full_hi):
    """``(a, b)`` with ``lo <= a <= b <= hi``: the loop over ``[lo, hi)`` runs masked on
    ``[lo, a)``, unmasked on ``[a, b)`` (the interior ``[full_lo, full_hi)`` inside it),
    masked on ``[b, hi)``."""
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.minimum(tl.maximum(full_hi, a), hi)
    return a, b


@triton.jit
def _key_runs(start_row_ptr, m0, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tiles query block ``[m0, m0 + BLOCK_M)`` visits (forward, dQ), as ``(lo, a, z, hi)``:
    masked on ``[lo, a)`` (from its first row's first key, rounded down to a tile), unmasked on
    ``[a, z)`` (keys at or after its last row's first key and at or before its first row), masked
    on ``[z, hi)`` (up to its last row). ``start_row_ptr``: the row of the start table."""
    hi = tl.minimum(m0 + BLOCK_M, S)
    lo = tl.load(start_row_ptr + m0) // BLOCK_N * BLOCK_N
    last_start = tl.load(start_row_ptr + hi - 1)
    a, z = _interior(lo, hi, tl.cdiv(last_start, BLOCK_N) * BLOCK_N, (m0 + 1) // BLOCK_N * BLOCK_N)
    return lo, a, z, hi


@triton.jit
def _kv_tile(k_base, v_base, stride_ks, stride_vs, cols, S, dims, MASKED: tl.constexpr):
    """The K and V rows ``cols`` of one head (rows past S as zeros when MASKED; unmasked tiles
    lie inside the sequence)."""
    if MASKED:
        col_ok = cols < S
        k = tl.load(k_base + cols[:, None] * stride_ks + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + dims[None, :], mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(k_base + cols[:, None] * stride_ks + dims[None, :])
        v = tl.load(v_base + cols[:, None] * stride_vs + dims[None, :])
    return k, v


@triton.jit
def _bound(s, softcap2, SOFTCAP: tl.constexpr):
    """``(s', t)``: the base-2 scores ``s`` bounded, ``s' = softcap2 * t`` with ``t = tanh(s / softcap2)``
    (``softcap2 = c * log2(e)``: the same bound as ``c tanh(r / c)`` on the natural scores ``r``),
    and ``t`` for the backward's ``1 - t^2``; without SOFTCAP ``(s, s)``. tanh through exp2 (Triton
    has no tanh): ``1 - 2 / (exp(2x) + 1)``, exact at both ends (exp2 overflowing to inf gives 1),
    absolute error about float32's epsilon near 0."""
    if SOFTCAP:
        t = 1.0 - 2.0 / (tl.math.exp2(s * (2.8853900817779268 / softcap2)) + 1.0)  # 2.885... = 2 log2(e)
        return softcap2 * t, t
    else:
        return s, s


@triton.jit
def _visible(rows, row_start, cols):
    """``[rows, cols]``: key j visible to query i, ``start[i] <= j <= i``."""
    return (cols[None, :] <= rows[:, None]) & (cols[None, :] >= row_start[:, None])


@triton.jit
def _query_block(q_ptr, k_ptr, v_ptr, start_ptr, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_vb,
                 stride_vh, H, S, GROUP, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """The program's query block (the forward's and the dQ kernel's prologue): its first row,
    (batch x head) index, batch, head, rows, valid rows, head dims, the q tile, each row's first
    visible key, and the bases of its KV head's K and V (query head h reads KV head h // GROUP)."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # int64: offsets of late heads may pass 2**31
    b, h = bh // H, bh % H
    hk = h // GROUP
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    row_start = tl.load(start_ptr + b * S + rows, mask=row_ok, other=0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    return m0, bh, b, h, rows, row_ok, dims, q, row_start, k_base, v_base


@triton.jit
def _forward_tile(q, k_base, v_base, stride_ks, stride_vs, rows, row_start, n0, S, qk_scale, softcap2, m_i, l_i,
                  acc, dims, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
                  SOFTCAP: tl.constexpr):
    """One key tile of the forward: the online softmax's running max, sum and output updated."""
    cols = n0 + tl.arange(0, BLOCK_N)
    k, v = _kv_tile(k_base, v_base, stride_ks, stride_vs, cols, S, dims, MASKED)
    s, _ = _bound(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, softcap2, SOFTCAP)
    if MASKED:
        visible = _visible(rows, row_start, cols)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def forward_kernel(
    q_ptr, k_ptr, v_ptr,  # [B, H, S, D] inputs, unit stride along D
    o_ptr,  # [B, H, S, D] out, contiguous, q's dtype
    lse_ptr,  # [B, H, S] float32 out, contiguous: natural log-sum-exp of the scaled scores
    start_ptr,  # [B, S] int32, contiguous: first key each position sees
    stride_qb, stride_qh, stride_qs,  # q's strides (elements); k and v's below
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    H, S,  # query heads, sequence
    GROUP,  # query heads per KV head: query head h reads KV head h // GROUP
    qk_scale,  # scale * log2(e): scores in base 2
    softcap2,  # softcap * log2(e): the bound in base 2 (read under SOFTCAP only)
    D: tl.constexpr,  # head dim (power of 2)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # query rows per program, key rows per step
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" for float32 inputs
    SOFTCAP: tl.constexpr,  # bound the scores (Gemma 2's logit softcap)
):
    m0, bh, b, h, rows, row_ok, dims, q, row_start, k_base, v_base = _query_block(
        q_ptr, k_ptr, v_ptr, start_ptr, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_vb, stride_vh,
        H, S, GROUP, D, BLOCK_M)
    # m: running max (base 2; finite start so a row with no visible key yet stays NaN-free),
    # l: running sum of exp2(s - m), acc: running sum of exp2(s - m) v.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    lo, a, z, hi = _key_runs(start_ptr + b * S, m0, S, BLOCK_M, BLOCK_N)
    for n0 in range(lo, a, BLOCK_N):
        m_i, l_i, acc = _forward_tile(q, k_base, v_base, stride_ks, stride_vs, rows, row_start, n0, S, qk_scale,
                                      softcap2, m_i, l_i, acc, dims, BLOCK_N, PRECISION, True, SOFTCAP)
    for n0 in range(a, z, BLOCK_N):
        m_i, l_i, acc = _forward_tile(q, k_base, v_base, stride_ks, stride_vs, rows, row_start, n0, S, qk_scale,
                                      softcap2, m_i, l_i, acc, dims, BLOCK_N, PRECISION, False, SOFTCAP)
    for n0 in range(z, hi, BLOCK_N):
        m_i, l_i, acc = _forward_tile(q, k_base, v_base, stride_ks, stride_vs, rows, row_start, n0, S, qk_scale,
                                      softcap2, m_i, l_i, acc, dims, BLOCK_N, PRECISION, True, SOFTCAP)
    o = acc / l_i[:, None]
    tl.store(o_ptr + bh * S * D + rows[:, None] * D + dims[None, :], o.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse_ptr + bh * S + rows, (m_i + tl.math.log2(l_i)) / 1.4426950408889634, mask=row_ok)


@triton.jit
def _dkdv_tile(k, v, q_base, do_base, stride_qs, stride_os, lse_ptr, delta_ptr, bh, cols, col_end, m0, S,
               qk_scale, softcap2, dk, dv, dims, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
               MASKED: tl.constexpr, SOFTCAP: tl.constexpr):
    """One query tile of the dK/dV backward, on transposed tiles ``[BLOCK_N, BLOCK_M]`` (P^T and
    dS^T, so that dv and dk are plain products)."""
    rows = m0 + tl.arange(0, BLOCK_M)
    if MASKED:
        row_ok = rows < S
        q = tl.load(q_base + rows[:, None] * stride_qs + dims[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_os + dims[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(lse_ptr + bh * S + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + bh * S + rows, mask=row_ok, other=0.0)
    else:
        q = tl.load(q_base + rows[:, None] * stride_qs + dims[None, :])
        do = tl.load(do_base + rows[:, None] * stride_os + dims[None, :])
        lse2 = tl.load(lse_ptr + bh * S + rows) * 1.4426950408889634
        delta = tl.load(delta_ptr + bh * S + rows)
    s_t, t_t = _bound(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale, softcap2, SOFTCAP)
    p_t = tl.math.exp2(s_t - lse2[None, :])
    if MASKED:
        visible = (rows[None, :] >= cols[:, None]) & (rows[None, :] <= col_end[:, None])
        p_t = tl.where(visible, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:
        ds_t = ds_t * (1.0 - t_t * t_t)
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # q, do [B, H, S, D], k, v [B, H / GROUP, S, D]; unit stride along D
    lse_ptr, delta_ptr,  # [B, H, S] float32, contiguous: the forward's lse, rowsum(o * do)
    dk_ptr, dv_ptr,  # [B, H / GROUP, S, D] out, contiguous, k's and v's dtype
    end_ptr,  # [B, S] int32, contiguous: last query that sees each position
    stride_qb, stride_qh, stride_qs,  # strides (elements) of q, k, v, do
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    H, S,  # query heads, sequence
    GROUP,  # query heads per KV head: this program sums over the GROUP query heads of its KV head
    qk_scale,  # scale * log2(e)
    scale,  # the softmax scale (dk = scale * dS^T q)
    softcap2,  # softcap * log2(e) (read under SOFTCAP only)
    D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # query rows per step, key rows per program
    PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1).to(tl.int64)  # (b, KV head)
    HK = H // GROUP
    b, hk = bhk // HK, bhk % HK
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < S
    dims = tl.arange(0, D)
    k = tl.load(k_ptr + b * stride_kb + hk * stride_kh + cols[:, None] * stride_ks + dims[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(v_ptr + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vs + dims[None, :],
                mask=col_ok[:, None], other=0.0)
    col_end = tl.load(end_ptr + b * S + cols, mask=col_ok, other=-1)  # -1: a key past S sees no query
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    lo = n0 // BLOCK_M * BLOCK_M
    hi = tl.load(end_ptr + b * S + tl.minimum(n0 + BLOCK_N, S) - 1) + 1
    # Interior tiles: queries at or after the last key, and at or before the first key's last query
    # (none when the block passes S: its first key's last query is then before its last key).
    first_end = tl.load(end_ptr + b * S + n0)
    a, z = _interior(lo, hi, tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M, (first_end + 1) // BLOCK_M * BLOCK_M)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_ob + h * stride_oh
        for m0 in range(lo, a, BLOCK_M):
            dk, dv = _dkdv_tile(k, v, q_base, do_base, stride_qs, stride_os, lse_ptr, delta_ptr, bh, cols, col_end,
                                m0, S, qk_scale, softcap2, dk, dv, dims, BLOCK_M, PRECISION, True, SOFTCAP)
        for m0 in range(a, z, BLOCK_M):
            dk, dv = _dkdv_tile(k, v, q_base, do_base, stride_qs, stride_os, lse_ptr, delta_ptr, bh, cols, col_end,
                                m0, S, qk_scale, softcap2, dk, dv, dims, BLOCK_M, PRECISION, False, SOFTCAP)
        for m0 in range(z, hi, BLOCK_M):
            dk, dv = _dkdv_tile(k, v, q_base, do_base, stride_qs, stride_os, lse_ptr, delta_ptr, bh, cols, col_end,
                                m0, S, qk_scale, softcap2, dk, dv, dims, BLOCK_M, PRECISION, True, SOFTCAP)
    out = bhk * S * D + cols[:, None] * D + dims[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_tile(q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, rows, row_start, n0, S, qk_scale, softcap2,
             dq, dims, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr):
    """One key tile of the dQ backward."""
    cols = n0 + tl.arange(0, BLOCK_N)
    k, v = _kv_tile(k_base, v_base, stride_ks, stride_vs, cols, S, dims, MASKED)
    s, t = _bound(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, softcap2, SOFTCAP)
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        visible = _visible(rows, row_start, cols)
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # [B, H, S, D] inputs, unit stride along D
    lse_ptr, delta_ptr,  # [B, H, S] float32, contiguous
    dq_ptr,  # [B, H, S, D] out, contiguous, q's dtype
    start_ptr,  # [B, S] int32, contiguous: first key each position sees
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    H, S, GROUP,
    qk_scale, scale, softcap2,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # query rows per program, key rows per step
    PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    m0, bh, b, h, rows, row_ok, dims, q, row_start, k_base, v_base = _query_block(
        q_ptr, k_ptr, v_ptr, start_ptr, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_vb, stride_vh,
        H, S, GROUP, D, BLOCK_M)
    do = tl.load(do_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + dims[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(lse_ptr + bh * S + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + bh * S + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    lo, a, z, hi = _key_runs(start_ptr + b * S, m0, S, BLOCK_M, BLOCK_N)
    for n0 in range(lo, a, BLOCK_N):
        dq = _dq_tile(q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, rows, row_start, n0, S, qk_scale,
                      softcap2, dq, dims, BLOCK_N, PRECISION, True, SOFTCAP)
    for n0 in range(a, z, BLOCK_N):
        dq = _dq_tile(q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, rows, row_start, n0, S, qk_scale,
                      softcap2, dq, dims, BLOCK_N, PRECISION, False, SOFTCAP)
    for n0 in range(z, hi, BLOCK_N):
        dq = _dq_tile(q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, rows, row_start, n0, S, qk_scale,
                      softcap2, dq, dims, BLOCK_N, PRECISION, True, SOFTCAP)
    tl.store(dq_ptr + bh * S * D + rows[:, None] * D + dims[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=row_ok[:, None])
