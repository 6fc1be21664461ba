"""FPDT-style chunked attention: exact attention computed one (query chunk, key chunk) pair at a
time, with the activations saved for the backward optionally kept in pinned host memory.

    o_BNSH, lse_BNS, host = chunked_attention(q_BNSH, k_BnSH, v_BnSH, is_causal, scale, chunks, offload,
                                              backend="auto")

``scale=None`` means ``H ** -0.5``. The sequence is cut into ``C = min(chunks, S)`` near-equal
chunks (the first ``S % C`` one row longer); q, k and v share the cut. Forward: query chunk i
attends to key chunk j with a kernel that also returns the log-sum-exp; when causal, the
diagonal pair (square, so a top-left mask is right for every kernel) runs with the causal mask,
the pairs below it without, and the pairs above it are never computed. The partial results fold
into a float32 running output with ``attention_merge.merge_attention``. ``o`` comes back in q's
dtype, ``lse`` in float32 (natural log). ``lse`` is not differentiable (marked so): the op
stands in for ``F.scaled_dot_product_attention``, which returns ``o`` alone.

Backward (ring-attention style): every visible pair is recomputed by the kernel's own backward
given the FINAL o and lse of its query chunk, so its P = exp(scale q k^T - lse) and
D = rowsum(do * o) are those of the whole attention and dq_i = sum_j dq_ij, dk_j = sum_i dk_ij,
dv_j = sum_i dv_ij. Query chunks run in the outer loop: dq_i sums in one float32 chunk buffer;
dk and dv sum in float32 [B, n, S, H] buffers for 16-bit inputs (adding C rounded-to-bf16 terms
in bf16 would round C more times; together 4/G the bytes of a 16-bit q) and in the
gradients themselves for float32/float64 inputs (a float32 buffer would be the gradient).
The backward is a second custom op, ``autosp::chunked_attention_backward``, taking the saved
tensors as per-chunk lists, so the joint graph holds two opaque calls and no chunk loop.

Offload (``offload=True``): the saved q, o, lse, k and v are pinned host copies, one per chunk,
which the op returns as its third output (``host``; empty without offload), so that a compiled
graph saves them and not the device tensors. Each is copied on the transfer stream as soon as
it exists (k and v chunks first, q chunk i before its pairs run, o and lse chunk i after them;
``host_offload.to_host``); lse is 1/H of o, so it travels with q and o rather than being a
special case. The backward reloads them in the order it uses them (q_i, o_i, lse_i, then k_j,
v_j for each visible j) and each reload starts the copy of the next group (``prefetch``): the
next chunk's transfer overlaps this chunk's compute and at most two groups are on the device. On the CPU ``offload``/``reload`` are plain copies, so
``offload=True`` runs the same code and changes nothing.

Backends (``backend``), each with grouped heads handled without repeating the whole sequence:
    "flash"      CUDA FlashAttention-2 (takes grouped heads)
    "efficient"  CUDA memory-efficient attention (needs n == N: each kv CHUNK is repeated)
    "cudnn"      CUDA cuDNN attention (takes grouped heads)
    "cpu_flash"  CPU flash attention (takes grouped heads)
    "math"       ``reference.attention_lse`` (plain torch, float32 arithmetic; any device)
    "auto"       what ``F.scaled_dot_product_attention`` would pick for a chunk pair (cuDNN for
                 bf16 on H100 with torch 2.11, efficient for float32, cpu flash on the CPU;
                 honours ``torch.nn.attention.sdpa_kernel``), the math one where it picks math.
The private aten ops live in ``autosp/_torch_private/attention.py`` (lse layouts there).

Legend: B batch, N query heads, n key/value heads (query head h reads kv head h // G),
G = N // n, S sequence, L query-chunk rows, M key-chunk rows, H head dim, C chunks.
"""

from __future__ import annotations

import torch

from autosp import _torch_private as tp
from autosp.kernels import host_offload, reference
from autosp.kernels.attention_merge import merge_attention

BACKENDS = ("auto", "flash", "efficient", "cudnn", "cpu_flash", "math")
_CUDA_ONLY = ("flash", "efficient", "cudnn")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# name: (forward, backward, whether the kernel takes n < N kv heads)
_KERNELS = {
    "flash": (tp.flash_attention_lse, tp.flash_attention_lse_backward, True),
    "efficient": (tp.efficient_attention_lse, tp.efficient_attention_lse_backward, False),
    "cudnn": (tp.cudnn_attention_lse, tp.cudnn_attention_lse_backward, True),
    "cpu_flash": (tp.cpu_flash_attention_lse, tp.cpu_flash_attention_lse_backward, True),
    "math": (reference.attention_lse, reference.attention_lse_backward, True),
}


def chunk_bounds(seq: int, chunks: int) -> list[tuple[int, int]]:
    """``min(chunks, seq)`` near-equal ``(start, end)`` ranges covering ``range(seq)``."""
    count = min(chunks, seq)
    base, extra = divmod(seq, count)
    bounds, start = [], 0
    for c in range(count):
        end = start + base + (1 if c < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _check(q_BNSH, k_BnSH, v_BnSH, chunks, backend) -> None:
    name = "chunked_attention"
    if q_BNSH.dim() != 4 or k_BnSH.dim() != 4 or v_BnSH.dim() != 4:
        raise ValueError(f"{name}: q, k, v must be [B, heads, S, H], got {list(q_BNSH.shape)}, "
                         f"{list(k_BnSH.shape)}, {list(v_BnSH.shape)}")
    b, heads, seq, dim = q_BNSH.shape
    if k_BnSH.shape != v_BnSH.shape or k_BnSH.shape[0] != b or k_BnSH.shape[2:] != q_BNSH.shape[2:]:
        raise ValueError(f"{name}: k {list(k_BnSH.shape)} and v {list(v_BnSH.shape)} must be "
                         f"[{b}, n, {seq}, {dim}] for q {list(q_BNSH.shape)} (self-attention, one head dim)")
    kv_heads = k_BnSH.shape[1]
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(f"{name}: {heads} query heads are not a multiple of {kv_heads} key/value heads")
    if seq < 1:
        raise ValueError(f"{name}: empty sequence (S = {seq})")
    if not (q_BNSH.dtype == k_BnSH.dtype == v_BnSH.dtype) or q_BNSH.dtype not in _DTYPES:
        raise ValueError(f"{name}: q, k, v must share one of {_DTYPES}, got {q_BNSH.dtype}, {k_BnSH.dtype}, "
                         f"{v_BnSH.dtype}")
    if not (q_BNSH.device == k_BnSH.device == v_BnSH.device):
        raise ValueError(f"{name}: q, k, v on different devices")
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"{name}: chunks must be an int >= 1, got {chunks!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")
    device = q_BNSH.device.type
    if (backend in _CUDA_ONLY and device != "cuda") or (backend == "cpu_flash" and device != "cpu"):
        raise ValueError(f"{name}: backend {backend!r} does not run on {device} tensors")


def _scale(q_BNSH, scale: float | None) -> float:
    return q_BNSH.shape[-1] ** -0.5 if scale is None else scale


def _resolve(backend: str, q_BNLH, k_BnMH, v_BnMH, is_causal: bool, scale: float) -> str:
    """The kernel to run: ``backend`` itself, or for "auto" the one SDPA would pick."""
    if backend != "auto":
        return backend
    from torch.nn.attention import SDPBackend

    choice = tp.sdpa_backend_choice(q_BNLH, k_BnMH, v_BnMH, is_causal, scale)
    if q_BNLH.is_cuda:
        fused = {SDPBackend.FLASH_ATTENTION: "flash", SDPBackend.EFFICIENT_ATTENTION: "efficient",
                 SDPBackend.CUDNN_ATTENTION: "cudnn"}
        return fused.get(choice, "math")
    return "cpu_flash" if q_BNLH.device.type == "cpu" and choice == SDPBackend.FLASH_ATTENTION else "math"


def _pair_forward(q_BNLH, k_BnMH, v_BnMH, causal: bool, scale: float, kernel: str):
    """Attention of one query chunk over one key chunk: (o_BNLH, lse_BNL float32)."""
    forward, _, grouped = _KERNELS[kernel]
    group = q_BNLH.shape[1] // k_BnMH.shape[1]
    if not grouped and group > 1:  # repeat one chunk's kv heads, never the whole sequence's
        k_BnMH, v_BnMH = k_BnMH.repeat_interleave(group, 1), v_BnMH.repeat_interleave(group, 1)
    return forward(q_BNLH, k_BnMH, v_BnMH, causal, scale)


def _pair_backward(do_BNLH, q_BNLH, k_BnMH, v_BnMH, o_BNLH, lse_BNL, causal: bool, scale: float, kernel: str):
    """This pair's share of dq, dk, dv, given the final o and lse of the query chunk."""
    _, backward, grouped = _KERNELS[kernel]
    group = q_BNLH.shape[1] // k_BnMH.shape[1]
    if grouped or group == 1:
        return backward(do_BNLH, q_BNLH, k_BnMH, v_BnMH, o_BNLH, lse_BNL, causal, scale)
    k_BNMH, v_BNMH = k_BnMH.repeat_interleave(group, 1), v_BnMH.repeat_interleave(group, 1)
    dq_BNLH, dk_BNMH, dv_BNMH = backward(do_BNLH, q_BNLH, k_BNMH, v_BNMH, o_BNLH, lse_BNL, causal, scale)
    return (dq_BNLH, dk_BNMH.unflatten(1, (-1, group)).sum(2, dtype=torch.float32),
            dv_BNMH.unflatten(1, (-1, group)).sum(2, dtype=torch.float32))


def _visible(i: int, count: int, is_causal: bool) -> range:
    """Key chunks that query chunk i attends to."""
    return range(i + 1 if is_causal else count)


@torch.library.custom_op("autosp::chunked_attention", mutates_args=())
def chunked_attention(q_BNSH: torch.Tensor, k_BnSH: torch.Tensor, v_BnSH: torch.Tensor, is_causal: bool,
                      scale: float | None, chunks: int, offload: bool, backend: str = "auto"
                      ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Attention over ``chunks`` sequence chunks: (o_BNSH in q's dtype, lse_BNS float32, the
    saved chunks' pinned host copies when ``offload``, else an empty list); see the module
    docstring."""
    _check(q_BNSH, k_BnSH, v_BnSH, chunks, backend)
    scale = _scale(q_BNSH, scale)
    b, heads, seq, _ = q_BNSH.shape
    bounds = chunk_bounds(seq, chunks)
    o_BNSH = q_BNSH.new_empty(q_BNSH.shape)
    lse_BNS = q_BNSH.new_empty((b, heads, seq), dtype=torch.float32)
    kernel = None
    if offload:  # the inputs' chunks travel while the attention runs
        k_host = [host_offload.to_host(k_BnSH[:, :, a:b]) for a, b in bounds]
        v_host = [host_offload.to_host(v_BnSH[:, :, a:b]) for a, b in bounds]
        q_host, o_host, lse_host = [], [], []
    for i, (qa, qb) in enumerate(bounds):
        q_BNLH = q_BNSH[:, :, qa:qb]
        if offload:
            q_host.append(host_offload.to_host(q_BNLH))
        o_acc_BNLH = lse_acc_BNL = None
        for j in _visible(i, len(bounds), is_causal):
            ka, kb = bounds[j]
            k_BnMH, v_BnMH = k_BnSH[:, :, ka:kb], v_BnSH[:, :, ka:kb]
            kernel = kernel or _resolve(backend, q_BNLH, k_BnMH, v_BnMH, is_causal, scale)
            o_BNLH, lse_BNL = _pair_forward(q_BNLH, k_BnMH, v_BnMH, is_causal and i == j, scale, kernel)
            if o_acc_BNLH is None:
                o_acc_BNLH, lse_acc_BNL = o_BNLH.float(), lse_BNL
            else:
                o_acc_BNLH, lse_acc_BNL = merge_attention(o_acc_BNLH, lse_acc_BNL, o_BNLH.float(), lse_BNL)
        o_BNSH[:, :, qa:qb] = o_acc_BNLH
        lse_BNS[:, :, qa:qb] = lse_acc_BNL
        if offload:
            o_host.append(host_offload.to_host(o_BNSH[:, :, qa:qb]))
            lse_host.append(host_offload.to_host(lse_BNS[:, :, qa:qb]))
    host = q_host + o_host + lse_host + k_host + v_host if offload else []
    return o_BNSH, lse_BNS, host


@chunked_attention.register_fake
def _(q_BNSH, k_BnSH, v_BnSH, is_causal, scale, chunks, offload, backend="auto"):
    _check(q_BNSH, k_BnSH, v_BnSH, chunks, backend)
    b, heads, seq, dim = q_BNSH.shape
    host = []
    if offload:  # contiguous pinned copies: q, o, lse, k, v chunk by chunk
        bounds = chunk_bounds(seq, chunks)
        kv_heads, dtype = k_BnSH.shape[1], q_BNSH.dtype
        for lead, tail, kind in (((b, heads), (dim,), dtype), ((b, heads), (dim,), dtype), ((b, heads), (), torch.float32),
                                 ((b, kv_heads), (dim,), dtype), ((b, kv_heads), (dim,), dtype)):
            host += [q_BNSH.new_empty((*lead, end - start, *tail), dtype=kind, device="cpu") for start, end in bounds]
    return q_BNSH.new_empty(q_BNSH.shape), q_BNSH.new_empty(q_BNSH.shape[:3], dtype=torch.float32), host


def _fetch(steps: list[tuple[torch.Tensor, ...]], device: torch.device, offloaded: bool):
    """Yield each step's tensors on ``device``: as they are, or reloaded from the host with the
    next step's copies started first (double buffering)."""
    for s, step in enumerate(steps):
        if not offloaded:
            yield step
            continue
        ahead = list(steps[s + 1]) if s + 1 < len(steps) else []
        first = host_offload.reload(step[0], device, ahead)
        yield (first, *(host_offload.reload(h, device, []) for h in step[1:]))


@torch.library.custom_op("autosp::chunked_attention_backward", mutates_args=())
def chunked_attention_backward(
    do_BNSH: torch.Tensor, q_chunks: list[torch.Tensor], k_chunks: list[torch.Tensor],
    v_chunks: list[torch.Tensor], o_chunks: list[torch.Tensor], lse_chunks: list[torch.Tensor],
    is_causal: bool, scale: float, offloaded: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq_BNSH, dk_BnSH, dv_BnSH of ``chunked_attention`` from its saved chunks (device views, or
    pinned host copies when ``offloaded``) and the incoming gradient of o."""
    device, dtype = do_BNSH.device, q_chunks[0].dtype
    b, heads, seq, dim = do_BNSH.shape
    kv_shape = (b, k_chunks[0].shape[1], seq, dim)
    acc = torch.promote_types(dtype, torch.float32)  # dq's chunk buffer; dk and dv's full buffers
    dq_BNSH = do_BNSH.new_empty(do_BNSH.shape, dtype=dtype)
    dk_acc_BnSH = torch.zeros(kv_shape, dtype=acc, device=device)
    dv_acc_BnSH = torch.zeros(kv_shape, dtype=acc, device=device)
    count = len(q_chunks)
    starts = [0]
    for q_BNLH in q_chunks:
        starts.append(starts[-1] + q_BNLH.shape[2])
    steps: list[tuple[torch.Tensor, ...]] = []  # in the order of use
    for i in range(count):
        steps.append((q_chunks[i], o_chunks[i], lse_chunks[i]))
        steps += [(k_chunks[j], v_chunks[j]) for j in _visible(i, count, is_causal)]
    fetched = _fetch(steps, device, offloaded)
    kernel = None
    for i in range(count):
        q_BNLH, o_BNLH, lse_BNL = next(fetched)
        do_BNLH = do_BNSH[:, :, starts[i]:starts[i + 1]].contiguous()
        dq_acc_BNLH = torch.zeros(q_BNLH.shape, dtype=acc, device=device)
        for j in _visible(i, count, is_causal):
            k_BnMH, v_BnMH = next(fetched)
            kernel = kernel or _resolve(backend, q_BNLH, k_BnMH, v_BnMH, is_causal, scale)
            dq_BNLH, dk_BnMH, dv_BnMH = _pair_backward(do_BNLH, q_BNLH, k_BnMH, v_BnMH, o_BNLH, lse_BNL,
                                                       is_causal and i == j, scale, kernel)
            dq_acc_BNLH += dq_BNLH
            dk_acc_BnSH[:, :, starts[j]:starts[j + 1]] += dk_BnMH
            dv_acc_BnSH[:, :, starts[j]:starts[j + 1]] += dv_BnMH
        dq_BNSH[:, :, starts[i]:starts[i + 1]] = dq_acc_BNLH
    return dq_BNSH, dk_acc_BnSH.to(dtype), dv_acc_BnSH.to(dtype)


@chunked_attention_backward.register_fake
def _(do_BNSH, q_chunks, k_chunks, v_chunks, o_chunks, lse_chunks, is_causal, scale, offloaded, backend):
    dtype = q_chunks[0].dtype
    kv_shape = (do_BNSH.shape[0], k_chunks[0].shape[1], do_BNSH.shape[2], do_BNSH.shape[3])
    return (do_BNSH.new_empty(do_BNSH.shape, dtype=dtype), do_BNSH.new_empty(kv_shape, dtype=dtype),
            do_BNSH.new_empty(kv_shape, dtype=dtype))


def _setup_context(ctx, inputs, output):
    q_BNSH, k_BnSH, v_BnSH, is_causal, scale, chunks, offload, backend = inputs
    o_BNSH, lse_BNS, host = output
    ctx.mark_non_differentiable(lse_BNS, *host)
    ctx.options = (is_causal, _scale(q_BNSH, scale), offload, backend)
    ctx.chunks = chunks
    # The host copies are the op's own outputs: under AOTAutograd the partitioner saves them as
    # they are (it cannot remake them without rerunning the attention), not the device tensors.
    if offload:
        ctx.save_for_backward(*host)
    else:
        ctx.save_for_backward(q_BNSH, o_BNSH, lse_BNS, k_BnSH, v_BnSH)


def _backward(ctx, do_BNSH, _d_lse, _d_host):
    is_causal, scale, offload, backend = ctx.options
    saved = ctx.saved_tensors
    if offload:
        count = len(saved) // 5
        qs, outs, lses, ks, vs = (list(saved[t * count:(t + 1) * count]) for t in range(5))
    else:
        bounds = chunk_bounds(saved[0].shape[2], ctx.chunks)
        qs, outs, lses, ks, vs = ([x[:, :, a:b] for a, b in bounds] for x in saved)
    dq, dk, dv = chunked_attention_backward(do_BNSH, qs, ks, vs, outs, lses, is_causal, scale, offload, backend)
    return (dq, dk, dv) + (None,) * (len(ctx.needs_input_grad) - 3)  # as many as the call had arguments


chunked_attention.register_autograd(_backward, setup_context=_setup_context)
CHUNKED_ATTENTION = torch.ops.autosp.chunked_attention.default


def chunked_scaled_dot_product_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
    chunks: int, offload: bool = False, backend: str = "auto",
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s signature over ``chunked_attention``: the output alone.
    Raises ValueError for what the op does not do (a mask, dropout, kv heads != query heads
    without ``enable_gqa``) instead of computing something else."""
    if attn_mask is not None:
        raise ValueError("chunked_attention: attn_mask is not supported (is_causal or no mask only)")
    if dropout_p != 0.0:
        raise ValueError(f"chunked_attention: dropout is not supported, got dropout_p={dropout_p}")
    if query.dim() == 4 and key.dim() == 4 and query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"chunked_attention: {query.shape[1]} query heads and {key.shape[1]} key/value heads "
                         "need enable_gqa=True")
    return torch.ops.autosp.chunked_attention(query, key, value, is_causal, scale, chunks, offload, backend)[0]
