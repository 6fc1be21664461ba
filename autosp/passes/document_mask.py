"""document_mask: attention masked to causal-within-documents runs as ``autosp::document_attention``.

Packed sequences put several documents in one row; a token attends to the earlier tokens of
its own document only. Given ``position_ids`` (and no ``attention_mask``) transformers builds
that mask under ``torch.compile`` from the position steps, as ``[B, 1, S, S]`` booleans: 512 GiB
at S = 512K, on every rank (after the all-to-all each rank attends over the whole sequence),
and SDPA's fast kernels take no mask. This pass proves from the graph that a mask is
``mask[b, h, i, j] = (j <= i) & (D[b, i] == D[b, j])`` with ``D`` the ``[B, S]`` document ids
(``causal_mask.document_ids``: exact, nothing guessed) and calls the document attention
kernel (autosp/kernels/document_attention.py) with ``D`` instead: no mask is built, and the
work is that of causal attention inside each document, not over the whole row.

It runs after ``shard_sequence``: the attention rule treats the masked call as any masked
self-attention (the mask and ``D`` are whole-sequence values every rank computes from its copy
of the inputs), and this pass then swaps the call between the all-to-alls. On one device it
swaps the model's own call.

Before (after shard_sequence; KV repeated to the local query heads)::

    P = position_ids                                                          # [B, S] int64
    D = cumsum(diff(P, prepend=P[:, :1] - 1) != 1, -1)                        # [B, S]
    mask = (P[b, j] <= P[b, i]) & (D[b, i] == D[b, j])                        # [B, 1, S, S]
    o_BKSH = sdpa(q_BKSH, k_BKSH, v_BKSH, attn_mask=mask)

After::

    o_BKSH = document_attention(q_BKSH, k_BKSH, v_BKSH, D, scale)[0]       # the mask is dead code

A call it cannot take (dropout, ``enable_gqa``, KV heads other than the query heads, a padded
sequence) keeps its mask, with a line in the plan saying why.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from autosp._torch_private import fake_mode_of, same_size, size_hint
from autosp.graph_utils import eliminate_dead_code, human_bytes, new_node, val, written_in_place
from autosp.kernels.document_attention import DOCUMENT_ATTENTION
from autosp.passes._attention import masked_calls
from autosp.passes._index_algebra import AND_OPS, COMPARISONS, Affine, Pred, abstract, is_causal, is_one

DOCUMENT_MASK = "autosp.document_mask"  # on SDPA calls (set by causal_mask): the mask is proven causal within documents


def document_mask_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Replace SDPA calls whose mask is proven document-causal by document attention."""
    plan = gm.meta["autosp.plan"]
    fake_mode = fake_mode_of([val(n) for n in gm.graph.nodes if n.op == "placeholder"])
    memo: dict = {}
    done = []
    for node, a, mask in masked_calls(gm.graph):
        doc = document_ids(mask, memo)
        if doc is None:
            if node.meta.get(DOCUMENT_MASK):  # proven before shard_sequence, not after it
                why = "the sequence is padded to a multiple of the group (a length that divides evenly avoids it)" \
                    if _padded(node, plan.seq_len) else "the rewritten mask is no longer proven"
                plan.note(f"document_mask: {node.name} keeps its document mask ({_mask_bytes(mask)}): {why}")
            continue
        why = _cannot_take(a, doc)
        if why:
            plan.note(f"document_mask: {node.name} keeps its document mask ({_mask_bytes(mask)}): {why}")
            continue
        with gm.graph.inserting_before(node):
            call = new_node(gm.graph, DOCUMENT_ATTENTION, (a["query"], a["key"], a["value"], doc, a.get("scale")),
                            like=node, fake_mode=fake_mode)  # (o, lse)
            out = new_node(gm.graph, operator.getitem, (call, 0), like=node, fake_mode=fake_mode)
        out.meta.update({key: value for key, value in node.meta.items() if key not in out.meta})
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        done.append(f"{out.name} (a {_mask_bytes(mask)} mask)")
    if done:
        eliminate_dead_code(gm.graph)
        gm.recompile()
        plan.note("attention masked to causal within documents (packed sequences): "
                  f"{', '.join(done)} run as document attention on the document ids; the masks are never built")
        unused = [f"{name}={value}" for name, value, off in (
            ("attention_chunks", cfg.options.attention_chunks, 1),
            ("attention_head_groups", cfg.options.attention_head_groups, 1)) if value != off]
        if unused:
            plan.note(f"document attention runs whole: {', '.join(unused)} apply to SDPA calls only (the kernel "
                      "keeps no score matrix and accumulates in registers)")
    return gm


def _cannot_take(a: dict, doc: fx.Node) -> str | None:
    """Why the kernel cannot take this call (None: it can)."""
    q, k, v = (val(a[n]) for n in ("query", "key", "value"))
    d = val(doc)
    if a["dropout_p"]:
        return "dropout"
    if not q.dim() == k.dim() == v.dim() == 4:
        return "q, k, v are not [B, H, S, D]"
    if a["enable_gqa"] or not (same_size(k.shape[1], q.shape[1]) and same_size(v.shape[1], q.shape[1])):
        return "key/value heads differ from the query heads"
    if not (same_size(k.shape[-1], q.shape[-1]) and same_size(v.shape[-1], q.shape[-1])):
        return "the value head dim differs from the query's (the kernel takes q, k, v of one shape)"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16, float32)"
    if not (same_size(q.shape[2], d.shape[1]) and same_size(k.shape[2], d.shape[1])):
        return "the attention's length is not the document ids' (a padded sequence?)"
    if not same_size(q.shape[0], d.shape[0]):
        return "the batch differs from the document ids'"
    return None


def _mask_bytes(mask: fx.Node) -> str:
    """The booleans of the mask for its batch (its heads are one broadcast copy)."""
    v = val(mask)
    return human_bytes(size_hint(v.shape[0]) * size_hint(v.shape[-2]) * size_hint(v.shape[-1])) \
        if isinstance(v, torch.Tensor) else "?"


def _padded(sdpa: fx.Node, seq_len: str | None) -> bool:
    """Whether the call attends over more positions than the sequence has (padded to P * L)."""
    q = val(sdpa.args[0])
    return seq_len is not None and isinstance(q, torch.Tensor) and str(q.shape[2]) != seq_len


# ----------------------------------------------------------------------------- the proof
def document_ids(mask: fx.Node, memo: dict) -> fx.Node | None:
    """The ``[B, S]`` document ids ``D`` when ``mask`` is provably causal attention inside
    documents, ``mask[b, h, i, j] = (j <= i) & (D[b, i] == D[b, j])``, with ``D`` an int64
    cumulative sum of booleans along the sequence (so nondecreasing, the kernel's precondition);
    ``None`` when it cannot be proven. ``memo``: the index algebra's, shared with its other calls.

    The mask must be an AND of: ``D[b, i] == D[b, j]`` (``b``, ``i``, ``j`` the batch, query and
    key indices, proven by the index algebra); an order, either by index (``j <= i``) or by
    positions, ``P[b, j] <= P[b, i]``; constants True. An order by positions needs
    ``D = cumsum(diff(P, prepend=one column) != 1)`` of the same int64 ``P`` (transformers'
    packed-sequence ids, made when ``position_ids`` are passed): inside a document positions
    step by exactly one (any other step starts a new document), so there the order of positions
    is the order of indices. That holds for positions below 2**40 in magnitude, as the index
    algebra assumes (no step wraps around int64). Nothing the proof reads may be written in place
    afterwards, through any alias (``graph_utils.written_in_place``).
    """
    mv = val(mask)
    if not isinstance(mv, torch.Tensor) or mv.dtype != torch.bool or mv.dim() != 4:
        return None
    if any(written_in_place(n) for n in _ancestors(mask) | {mask}):
        return None
    batch, seq = mv.shape[0], mv.shape[-1]
    if not same_size(mv.shape[-2], seq):
        return None
    docs: dict[fx.Node, fx.Node] = {}  # the ids' source -> the [B, S] tensor the mask gathers them from
    position_orders, index_order = set(), False
    for leaf in _conjuncts(mask):
        p = abstract(leaf, memo)
        if isinstance(p, Pred) and p.affine is None and p.const:
            continue  # True
        if is_causal(p, val(leaf)):
            index_order = True
            continue
        compared = _compared_gathers(leaf, batch, seq, memo)
        if compared is None:
            return None
        op, (x, source, at), (_, other, bt) = compared
        if source is not other:
            return None
        if op == "eq" and {at, bt} == {"q", "kv"}:
            docs[source] = x
        elif (op, at, bt) in (("le", "kv", "q"), ("ge", "q", "kv")):
            position_orders.add(source)
        else:
            return None
    if len(docs) != 1:
        return None
    [(source, ids)] = docs.items()
    made_from = _cumsum_of_flags(source)
    if made_from is None:
        return None
    if position_orders:  # ordered by positions: the ids must be made from those positions' steps
        return ids if made_from is not _FLAGS and position_orders == {made_from} else None
    return ids if index_order else None  # without an order: both directions, not causal


_FLAGS = object()  # ``_cumsum_of_flags``: the flags are not the steps of positions


def _cumsum_of_flags(doc: fx.Node):
    """``P`` when ``doc`` is ``cumsum(diff(P, prepend=one column) != 1)`` along the sequence, int64;
    ``_FLAGS`` when it is another int64 cumulative sum of booleans along it; None otherwise."""
    if doc.op not in ("call_function", "call_method") or doc.target not in (torch.cumsum, "cumsum"):
        return None
    dim = doc.kwargs.get("dim", doc.args[1] if len(doc.args) > 1 else None)
    flags = doc.args[0]
    if dim not in (-1, 1) or val(doc).dtype != torch.int64 or val(doc).dim() != 2 or not isinstance(flags, fx.Node) \
            or getattr(val(flags), "dtype", None) != torch.bool:
        return None
    if flags.op not in ("call_function", "call_method") or COMPARISONS.get(flags.target) != "ne" \
            or len(flags.args) != 2 or 1 not in flags.args:
        return _FLAGS
    step = flags.args[0] if flags.args[1] == 1 else flags.args[1]
    if not isinstance(step, fx.Node) or step.op not in ("call_function", "call_method") \
            or step.target not in (torch.diff, "diff"):
        return _FLAGS
    a = dict(zip(("input", "n", "dim", "prepend", "append"), step.args, strict=False))
    a.update(step.kwargs)
    positions = a.get("input")
    # The steps of P's own columns, one column prepended: diff's input has the ids' shape.
    if a.get("n", 1) != 1 or a.get("append") is not None or a.get("dim", -1) not in (-1, 1) \
            or not isinstance(positions, fx.Node) or getattr(val(positions), "dtype", None) != torch.int64 \
            or tuple(val(positions).shape) != tuple(val(doc).shape):
        return _FLAGS
    return _strip_same_values(positions)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _conjuncts(node: fx.Node) -> list[fx.Node]:
    """The leaves of an AND of booleans (looking through value-keeping casts and expands)."""
    node = _strip_same_values(node)
    if node.op in ("call_function", "call_method") and node.target in AND_OPS and len(node.args) == 2 \
            and all(isinstance(a, fx.Node) and getattr(val(a), "dtype", None) == torch.bool for a in node.args) \
            and not node.kwargs:
        return _conjuncts(node.args[0]) + _conjuncts(node.args[1])
    return [node]


def _strip_same_values(node: fx.Node) -> fx.Node:
    """Through ``.to`` (same dtype), ``contiguous``, ``clone`` and ``expand`` (a broadcast: two
    broadcasts of one source to one shape hold the same values)."""
    while node.op in ("call_method", "call_function") and node.args and isinstance(node.args[0], fx.Node):
        t, src = node.target, node.args[0]
        src_val, node_val = val(src), val(node)
        same_dtype = isinstance(src_val, torch.Tensor) and isinstance(node_val, torch.Tensor) \
            and src_val.dtype == node_val.dtype
        if same_dtype and (t in ("contiguous", "clone", "expand") or t == "to"):
            node = src
            continue
        break
    return node


def _compared_gathers(leaf: fx.Node, batch, seq, memo):
    """``(op, (x, source, "q" | "kv"), (x, source, "q" | "kv"))`` when ``leaf`` compares ``X[b, i]``
    or ``X[b, j]`` of ``[B, S]`` integer tensors (see ``_gathered``); else None."""
    op = COMPARISONS.get(leaf.target) if leaf.op in ("call_function", "call_method") else None
    if op not in ("eq", "le", "ge") or len(leaf.args) != 2 or leaf.kwargs:
        return None
    sides = [_gathered(_strip_same_values(a), batch, seq, memo) if isinstance(a, fx.Node) else None
             for a in leaf.args]
    return None if None in sides else (op, sides[0], sides[1])


def _gathered(node: fx.Node, batch, seq, memo):
    """``(X, source, "q" | "kv")`` when ``node`` is ``X[b_idx, i_idx]`` of an int64 ``X`` of shape
    ``[B, S]``, ``b_idx`` the batch index ``b`` and ``i_idx`` the query index ``i`` or key index
    ``j`` of a 4-D ``[B, 1, Sq, Sk]`` mask; ``source`` names ``X``'s values (``_strip_same_values``)."""
    if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[1], tuple) \
            or len(node.args[1]) != 2:
        return None
    x, (b_idx, i_idx) = node.args[0], node.args[1]
    xv = val(x) if isinstance(x, fx.Node) else None
    if not isinstance(xv, torch.Tensor) or xv.dim() != 2 or xv.dtype != torch.int64 \
            or not (same_size(xv.shape[0], batch) and same_size(xv.shape[1], seq)):
        return None
    b, i = abstract(b_idx, memo), abstract(i_idx, memo)
    if not (isinstance(b, Affine) and isinstance(i, Affine) and len(b.coef) == 4 and len(i.coef) == 4):
        return None
    if b.const != 0 or b.coef[1:] != (0, 0, 0) or not (b.coef[0] == 1 or is_one(batch)) \
            or not same_size(val(b_idx).shape[0], batch) or i.const != 0:
        return None
    if i.coef == (0, 0, 1, 0) and same_size(val(i_idx).shape[2], seq):
        return x, _strip_same_values(x), "q"
    if i.coef == (0, 0, 0, 1) and same_size(val(i_idx).shape[3], seq):
        return x, _strip_same_values(x), "kv"
    return None
