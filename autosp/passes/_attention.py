"""The attention rule: sequence shards in, all-to-all to head shards, attention over the whole
sequence, all-to-all back.

Before (q_BNLH etc. are this rank's sequence shard after the sweep)::

    o = sdpa(q_BNLH, k_BnLH, v_BnLH, is_causal=True, enable_gqa=True)

After::

    q_BKSH, k_BkSH, v_BkSH = seq_to_head_many([q_BNLH, k_BnLH, v_BnLH])   # one all-to-all
    k_BKSH = repeat_interleave(k_BkSH, K // k, dim=1); v_BKSH = ...   # local, after the all-to-all
    o_BKSH = sdpa(q_BKSH, k_BKSH, v_BKSH, is_causal=True)
    o_BNLH = head_to_seq(o_BKSH)

KV heads (n) divisible by P are sent as they are (the model's own repeat, HF's repeat_kv or
``repeat_interleave`` over the heads, is moved after the all-to-all too) and repeated to the local query heads, so no kernel needs ``enable_gqa``; when P is a multiple of n they are first
replicated P/n times (their gradients sum back through the replication); any other head count
is made even by repeating KV to the query heads and padding heads with zeros (dropped after).
A sequence padded to P*L keeps real positions exact: causal attention never looks ahead, a mask
is padded so that real queries never see padded keys, and a non-causal call without a mask gets
a key mask of length S.
"""

from __future__ import annotations

import contextlib
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from autosp.collectives import pad_dim
from autosp.graph_utils import fake_eval, global_val, new_node, set_val, val
from autosp.kernels.chunked_attention import CHUNKED_ATTENTION
from autosp.kernels.document_attention import DOCUMENT_ATTENTION
from autosp.kernels.softcap_attention import softcap_attention
from autosp.layout import FULL, SEQ, full, seq
from autosp.passes._context import LAYOUT, SITE, ShardContext, layout_of
from autosp.passes._rule_base import Decision, _arg, fallback

SDPA_TARGETS = (
    F.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
    softcap_attention,  # SDPA's signature and a softcap (eager_attention makes it; no SDPA kernel runs it)
)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def is_attention_call(node: fx.Node) -> bool:
    """SDPA, or one of the attention ops passes put in its place (chunked, document)."""
    return node.op == "call_function" and (node.target in SDPA_TARGETS
                                           or node.target in (CHUNKED_ATTENTION, DOCUMENT_ATTENTION))


def masked_calls(graph: fx.Graph) -> list[tuple[fx.Node, dict, fx.Node]]:
    """``(call, its arguments by name, its mask)`` of every SDPA call given a mask tensor and not
    ``is_causal``, in graph order (a list: the caller may rewrite them)."""
    out = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            a = sdpa_args(node)
            if isinstance(a["attn_mask"], fx.Node) and not a["is_causal"]:
                out.append((node, a, a["attn_mask"]))
    return out


# An additive mask's value where a key is masked: at most this (transformers uses finfo.min).
# Added to a finite score it leaves exp() in float32 at exactly 0.
MASKED_AT_MOST = -1e30


def additive_source(mask: fx.Node) -> fx.Node | None:
    """b if ``mask`` is ``where(b, 0, x)``, b boolean and x a number at most ``MASKED_AT_MOST``
    (transformers' eager mask; ``eager_attention`` passes it to SDPA as it is): added to the
    scores it gives every query row the softmax that b gives, for each row that b lets see a key.
    A causal or document-causal b lets every row see its own position, so where the pass proves
    b such, the additive mask is that mask too."""
    if not (mask.op == "call_function" and mask.target is torch.where and len(mask.args) == 3 and not mask.kwargs):
        return None
    b, zero, masked = mask.args
    if not (isinstance(b, fx.Node) and isinstance(val(b), torch.Tensor) and val(b).dtype == torch.bool):
        return None
    is_zero = (isinstance(zero, (int, float)) and zero == 0) or (
        isinstance(zero, fx.Node) and zero.op == "call_function" and zero.target in (torch.zeros, torch.zeros_like))
    if not is_zero or not isinstance(masked, (int, float)) or isinstance(masked, bool) or masked > MASKED_AT_MOST:
        return None
    return b


def self_attention_calls(graph: fx.Graph) -> list[fx.Node]:
    """The SDPA calls ``find_attention`` marked as self-attention, in graph order (a list: the
    caller may rewrite them)."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS
            and n.meta.get(SITE, {}).get("kind", "").startswith("self-attention")]


def sdpa_args(node: fx.Node) -> dict:
    """The SDPA call's arguments by name (``softcap``: softcap_attention's bound, None for SDPA)."""
    out = dict(zip(_SDPA_ARGS, node.args, strict=False))
    out.update(node.kwargs)
    out.setdefault("softcap", None)
    out.setdefault("attn_mask", None)
    out.setdefault("dropout_p", 0.0)
    out.setdefault("is_causal", False)
    out.setdefault("enable_gqa", False)
    return out


def attention_needs(node: fx.Node, ctx: ShardContext) -> Decision | None:
    """Layouts the attention rule wants of q, k, v (sequence shards on dim -2); None if it cannot."""
    a = sdpa_args(node)
    need = {}
    for name in ("query", "key", "value"):
        n = a[name]
        nd = global_val(n).dim()
        want = seq(nd - 2)
        lay = layout_of(n)
        if lay.kind == SEQ and lay != want:
            return fallback(node, ctx, f"{name} is sharded on dim {lay.dim}, not the sequence dim of attention")
        if lay.kind not in (SEQ, FULL):
            return fallback(node, ctx, f"{name} has layout {lay}")
        if lay.kind != SEQ:
            need[n] = (want, 0)
    mask = a["attn_mask"]
    if isinstance(mask, fx.Node) and layout_of(mask).kind != FULL:
        need[mask] = (full(), 0)
    return Decision(out=None, need=need)


def rewrite_attention(node: fx.Node, ctx: ShardContext) -> fx.Node:
    """Rewrite one SDPA node whose q, k, v are sequence shards; returns the node holding the output shard."""
    g, fm, P = ctx.graph, ctx.fake_mode, ctx.world
    a = sdpa_args(node)
    q, k, v = a["query"], a["key"], a["value"]
    nd = val(q).dim()
    seq_dim, head_dim = nd - 2, nd - 3
    n_q, n_kv = global_val(q).shape[head_dim], global_val(k).shape[head_dim]
    gqa = bool(a["enable_gqa"]) and n_kv != n_q
    local_repeat = None  # KV repeated to the query heads by the model (repeat_kv): repeat after the all-to-all
    k_src, v_src = kv_repeat_source(k, head_dim), kv_repeat_source(v, head_dim)
    if not gqa and k_src is not None and v_src is not None and k_src[1] == v_src[1]:
        (k, group), (v, _) = k_src, v_src
        n_kv = n_q // group
        gqa = True
        local_repeat = group

    def emit(target, args, kwargs=None):
        return new_node(g, target, args, kwargs, like=node, fake_mode=fm)

    with g.inserting_before(node):
        plan_note = f"{n_q} query heads, {n_kv} KV heads"
        if local_repeat:
            plan_note += f" (the model's repeat x{local_repeat} moved after the all-to-all)"
        if gqa and n_q % P == 0 and n_kv % P == 0:
            plan_note += ": KV sent at their own head count"
        elif gqa and n_q % P == 0 and P % n_kv == 0:
            rep = P // n_kv
            k = emit(torch.repeat_interleave, (k, rep), {"dim": head_dim})
            v = emit(torch.repeat_interleave, (v, rep), {"dim": head_dim})
            plan_note += f": KV replicated x{rep} so each rank gets one"
        elif gqa:
            rep = n_q // n_kv
            k = emit(torch.repeat_interleave, (k, rep), {"dim": head_dim})
            v = emit(torch.repeat_interleave, (v, rep), {"dim": head_dim})
            gqa, local_repeat = False, None
            plan_note += f": KV repeated x{rep} to the query heads (head counts do not split over {P} ranks)"
        pad_heads = (-n_q) % P
        if pad_heads:
            widths = [0, 0] * (nd - 1 - head_dim) + [0, pad_heads]
            q, k, v = (emit(F.pad, (t, widths)) for t in (q, k, v))
            plan_note += f"; heads padded {n_q} -> {n_q + pad_heads} with zeros"
        if val(q).dtype == val(k).dtype == val(v).dtype:  # one all-to-all for the three
            q_h, k_h, v_h = ctx.seq_to_head_many([q, k, v], seq_dim, head_dim, node)
        else:
            q_h, k_h, v_h = (ctx.seq_to_head(t, seq_dim, head_dim, node) for t in (q, k, v))
        if gqa:  # KV crossed at their own head count; repeat them to the local query heads here so
            # that every SDPA kernel can take the call (the efficient one does not take grouped KV);
            # the grouped_kv pass folds the repeat into the call where the device's kernel takes it
            rep = val(q_h).shape[head_dim] // val(k_h).shape[head_dim]
            k_h = emit(torch.repeat_interleave, (k_h, rep), {"dim": head_dim})
            v_h = emit(torch.repeat_interleave, (v_h, rep), {"dim": head_dim})
            gqa = False
        mask = _head_mask(a, ctx, node, emit, head_dim, n_q, pad_heads)

    kwargs = {k_: v_ for k_, v_ in node.kwargs.items() if k_ not in _SDPA_ARGS and k_ != "enable_gqa"}
    kwargs.update(attn_mask=mask, dropout_p=a["dropout_p"], is_causal=a["is_causal"])
    if "scale" in a:
        kwargs["scale"] = a["scale"]
    node.args = (q_h, k_h, v_h)
    node.kwargs = kwargs
    set_val(node, fake_eval(node, fm))
    with g.inserting_after(node):
        out = ctx.head_to_seq(node, seq_dim, head_dim, node)
        if pad_heads:
            with g.inserting_after(out):
                out = new_node(g, torch.narrow, (out, head_dim, 0, n_q), like=node, fake_mode=fm)
    out.meta[LAYOUT] = seq(seq_dim)
    ctx.plan.note(f"{node.name}: {plan_note}")
    return out


def kv_repeat_source(kv: fx.Node, head_dim: int) -> tuple[fx.Node, int] | None:
    """``(source, g)`` when ``kv`` is ``source`` with each head repeated g times in place
    (``x[:, :, None].expand(B, n, g, S, H).reshape(B, n*g, S, H)``, HF's repeat_kv; or
    ``repeat_interleave(x, g, dim=head_dim)``, as a function or a tensor method), else None.

    Proven from shapes: the reshape merges exactly the new size-g dim into the head dim.
    """
    if isinstance(kv, fx.Node) and (kv.target is torch.repeat_interleave
                                    or (kv.op == "call_method" and kv.target == "repeat_interleave")):
        return _interleave_source(kv, head_dim)
    if not (isinstance(kv, fx.Node) and kv.target in ("reshape", "view", torch.reshape)):
        return None
    expanded = kv.args[0]
    if not (isinstance(expanded, fx.Node) and expanded.target == "expand"):
        return None
    unsq = expanded.args[0]
    if not isinstance(unsq, fx.Node):
        return None
    if unsq.target == "unsqueeze" or unsq.target is torch.unsqueeze:
        src = unsq.args[0]
    elif unsq.target is operator.getitem and isinstance(unsq.args[1], tuple) and None in unsq.args[1] \
            and all(i is None or i is Ellipsis or i == slice(None) for i in unsq.args[1]):
        src = unsq.args[0]  # only new dims and full slices: an index tensor or a step would reorder
    else:
        return None
    src_v, unsq_v, exp_v, out_v = (global_val(n) for n in (src, unsq, expanded, kv))
    if not all(isinstance(t, torch.Tensor) for t in (src_v, unsq_v, exp_v, out_v)):
        return None
    n, d = src_v.shape[head_dim], src_v.dim()
    if unsq_v.dim() != d + 1 or exp_v.dim() != d + 1 or out_v.dim() != d:
        return None
    want_unsq = list(src_v.shape[: head_dim + 1]) + [1] + list(src_v.shape[head_dim + 1 :])
    if list(unsq_v.shape) != want_unsq:
        return None
    group = exp_v.shape[head_dim + 1]
    want_exp = list(src_v.shape[: head_dim + 1]) + [group] + list(src_v.shape[head_dim + 1 :])
    want_out = list(src_v.shape[:head_dim]) + [n * group] + list(src_v.shape[head_dim + 1 :])
    if list(exp_v.shape) != want_exp or list(out_v.shape) != want_out or not isinstance(group, int):
        return None
    return src, group


def _interleave_source(kv: fx.Node, head_dim: int) -> tuple[fx.Node, int] | None:
    """``(source, g)`` for ``repeat_interleave(source, g, dim)`` with a whole number g over the
    head dim; None for a tensor of repeats, another dim or no dim (a flattened result)."""
    src, rep, dim = kv.args[0], _arg(kv, 1, "repeats"), _arg(kv, 2, "dim")
    src_v = global_val(src) if isinstance(src, fx.Node) else None
    if not isinstance(src_v, torch.Tensor) or isinstance(rep, bool) or not isinstance(rep, int) or rep < 1 \
            or isinstance(dim, bool) or not isinstance(dim, int):
        return None
    if dim % src_v.dim() != head_dim % src_v.dim():
        return None
    return src, rep


def grouped_source(kv: fx.Node) -> tuple[fx.Node, int] | None:
    """``(source, g)`` when the 4-d ``[B, N, S, H]`` KV ``kv`` is ``source`` with each head repeated g
    times in place (query head h reads KV head h // g): a ``repeat_interleave`` over the head dim
    (autosp's attention rule, or the model's, in either form) or HF's ``repeat_kv``; else None."""
    if not isinstance(kv, fx.Node) or not isinstance(val(kv), torch.Tensor) or val(kv).dim() != 4:
        return None
    return kv_repeat_source(kv, 1)


def attention_kernel_context(kernel: str):
    """The SDPA backend restriction for ``Config.attention`` (no restriction for "auto")."""
    if kernel == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    choice = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[kernel]
    return sdpa_kernel([choice])


def _head_mask(a, ctx: ShardContext, node, emit, head_dim, n_q, pad_heads):
    """The mask as the head-sharded attention sees it: this rank's heads, padded sequence."""
    mask = a["attn_mask"]
    padded = ctx.dynamic or ctx.seq_len % ctx.world != 0
    if mask is None:
        if a["is_causal"] or not padded:
            return None
        s_pad = emit(operator.mul, (ctx.l_arg(), ctx.world)) if ctx.dynamic else ctx.l_arg() * ctx.world
        positions = emit(torch.arange, (s_pad,), {"device": val(a["query"]).device})
        return emit(torch.lt, (positions, ctx.s_arg()))
    mv = global_val(mask)
    if mv.dim() >= 3 and ctx.hint(mv.shape[-3]) == n_q and n_q > 1:
        if pad_heads:
            widths = [0, 0] * 2 + [0, pad_heads]
            mask = emit(F.pad, (mask, widths))
        local = (n_q + pad_heads) // ctx.world
        mask = emit(torch.narrow, (mask, mv.dim() - 3, ctx.rank * local, local))
    if padded:
        if ctx.dynamic:
            pad = emit(operator.sub, (emit(operator.mul, (ctx.l_arg(), ctx.world)), ctx.s_arg()))
        else:
            pad = ctx.l_arg() * ctx.world - ctx.seq_len
        is_bool = mv.dtype == torch.bool
        blocked = False if is_bool else float("-inf")
        allowed = True if is_bool else 0.0
        nd = mv.dim()
        mask = emit(pad_dim, (mask, nd - 1, pad, blocked))  # real queries never see padded keys
        mask = emit(pad_dim, (mask, nd - 2, pad, allowed))  # padded queries see everything
    return mask
