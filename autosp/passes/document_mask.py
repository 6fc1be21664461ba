"""document_mask: attention masked to causal-within-documents, or to a sliding window, runs as
``autosp::document_attention``.

Packed sequences put several documents in one row; a token attends to the earlier tokens of
its own document only. Given ``position_ids`` (and no ``attention_mask``) transformers builds
that mask under ``torch.compile`` from the position steps, as ``[B, 1, S, S]`` booleans: 512 GiB
at S = 512K, on every rank (after the all-to-all each rank attends over the whole sequence),
and SDPA's fast kernels take no mask. Models with a sliding window (Mistral, Qwen2/3 with
``use_sliding_window``, Gemma 3's local layers) build one the same way, with ``i - j < W``
added; their work is S x W, not S^2 / 2, which no SDPA kernel skips. This pass proves from the
graph that a mask is ``mask[b, h, i, j] = (j <= i) & (D[b, i] == D[b, j]) & (i - j < W)``
(``document_form``: exact, nothing guessed; ``D`` the ``[B, S]`` document ids, or one document
a row; ``W`` a window, or none) and calls the document attention kernel
(autosp/kernels/document_attention.py) with ``D`` and ``W`` instead: no mask is built, and the
work is that of the visible pairs only.

It runs after ``shard_sequence``: the attention rule treats the masked call as any masked
self-attention (the mask and ``D`` are whole-sequence values every rank computes from its copy
of the inputs), and this pass then swaps the call between the all-to-alls. On one device it
swaps the model's own call.

Before (after shard_sequence; KV repeated to the local query heads)::

    P = position_ids                                                          # [B, S] int64
    D = cumsum(diff(P, prepend=P[:, :1] - 1) != 1, -1)                        # [B, S]
    mask = (P[b, j] <= P[b, i]) & (P[b, j] > P[b, i] - W) & (D[b, i] == D[b, j])  # [B, 1, S, S]
    o_BKSH = sdpa(q_BKSH, k_BKSH, v_BKSH, attn_mask=mask)

After::

    o_BKSH = document_attention(q_BKSH, k_BKSH, v_BKSH, D, scale, W)[0]    # the mask is dead code

A call it cannot take (dropout, a padded sequence, KV heads that do not divide the query heads)
keeps its mask, with a line in the plan saying why. Repeated KV (grouped-query attention) is
read at its own head count by pass ``grouped_kv``, which runs next.

Scores bounded by a logit softcap (Gemma 2: ``softcap_attention``, made by ``eager_attention``)
go to the kernel with their bound: with a proven mask as above, and also when causal with no
mask (``is_causal=True``, what ``causal_mask`` makes of Gemma 2's full layers), as one document
a row. ``softcap_attention`` builds the ``[B, H, S, S]`` scores; the kernel never does::

    o_BKSH = softcap_attention(q_BKSH, k_BKSH, v_BKSH, is_causal=True, scale=s, softcap=c)
        ->  o_BKSH = document_attention(q_BKSH, k_BKSH, v_BKSH, None, s, None, c)[0]
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from autosp._torch_private import fake_mode_of, same_size, size_hint
from autosp.graph_utils import ancestors, eliminate_dead_code, human_bytes, new_node, val, written_in_place
from autosp.kernels.document_attention import DOCUMENT_ATTENTION, check_positions
from autosp.kernels.softcap_attention import softcap_attention
from autosp.passes._attention import additive_source, masked_calls, sdpa_args
from autosp.passes._index_algebra import (
    AND_OPS,
    COMPARISONS,
    POSITION_LIMIT,
    Affine,
    Pred,
    abstract,
    is_causal,
    is_one,
)

DOCUMENT_MASK = "autosp.document_mask"  # on SDPA calls (set by causal_mask): the mask is proven causal within documents


def document_mask_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Replace SDPA calls whose mask is proven document-causal and/or windowed by document attention."""
    plan = gm.meta["autosp.plan"]
    fake_mode = fake_mode_of([val(n) for n in gm.graph.nodes if n.op == "placeholder"])
    memo: dict = {}
    done, checked = [], set()
    for node, a, mask in masked_calls(gm.graph):
        form = document_form(additive_source(mask) or mask, memo)
        if form is None:
            proven_before = node.meta.get(DOCUMENT_MASK)  # proven before shard_sequence, not after it
            if proven_before:
                why = "the sequence is padded to a multiple of the group (a length that divides evenly avoids it)" \
                    if _padded(node, plan.seq_len) else "the rewritten mask is no longer proven"
                plan.note(f"document_mask: {node.name} keeps its mask ({proven_before}, {_mask_bytes(mask)}): {why}")
            continue
        why = _cannot_take(a, form.ids)
        if why:
            plan.note(f"document_mask: {node.name} keeps its mask ({form.describe()}, {_mask_bytes(mask)}): {why}")
            continue
        with gm.graph.inserting_before(node):
            if form.positions is not None and form.positions not in checked:  # the proof's assumption, at run time
                checked.add(form.positions)
                new_node(gm.graph, check_positions, (form.positions, POSITION_LIMIT), like=node, fake_mode=fake_mode)
            out = _swap(gm, node, a, form.ids, form.window, fake_mode)
        capped = "" if a["softcap"] is None else f", scores bounded by a softcap of {a['softcap']:g} in the kernel"
        done.append((form.describe(), f"{out.name} (a {_mask_bytes(mask)} mask{capped})"))
    for node in list(gm.graph.nodes):  # causal softcap calls: one document a row
        if node.op != "call_function" or node.target is not softcap_attention:
            continue
        a = sdpa_args(node)
        if not a["is_causal"] or a["attn_mask"] is not None:
            continue  # a mask not proven above keeps softcap_attention (its note is causal_mask's)
        why = _cannot_take(a, None)
        if why:
            plan.note(f"document_mask: {node.name} (causal, a logit softcap) stays softcap_attention, which builds "
                      f"the scores: {why}")
            continue
        with gm.graph.inserting_before(node):
            out = _swap(gm, node, a, None, None, fake_mode)
        done.append((_CAUSAL_SOFTCAP, out.name))
    if done:
        eliminate_dead_code(gm.graph)
        gm.recompile()
        for kind in dict.fromkeys(k for k, _ in done):
            calls = [c for k, c in done if k == kind]
            if kind == _CAUSAL_SOFTCAP:
                plan.note(f"{kind}: {', '.join(calls)} run as document attention (one document a row, the scores "
                          "bounded in the kernel); the score matrix is never built")
                continue
            plan.note(f"attention masked to {kind}: {', '.join(calls)} run as document attention on "
                      f"{'the document ids' if 'documents' in kind else 'the window alone'}; the masks are never built")
        unused = [f"{name}={value}" for name, value, off in (
            ("attention_chunks", cfg.options.attention_chunks, 1),
            ("attention_head_groups", cfg.options.attention_head_groups, 1)) if value != off]
        if unused:
            plan.note(f"document attention runs whole: {', '.join(unused)} apply to SDPA calls only (the kernel "
                      "keeps no score matrix and accumulates in registers)")
    return gm


_CAUSAL_SOFTCAP = "causal attention with a logit softcap"  # its plan line is its own


def _swap(gm: fx.GraphModule, node: fx.Node, a: dict, ids: fx.Node | None, window: int | None, fake_mode) -> fx.Node:
    """Replace the SDPA call ``node`` by document attention's output (inserted where the graph's
    insertion point is); the new output node."""
    call = new_node(gm.graph, DOCUMENT_ATTENTION,
                    (a["query"], a["key"], a["value"], ids, a.get("scale"), window, a["softcap"]),
                    like=node, fake_mode=fake_mode)  # (o, lse)
    out = new_node(gm.graph, operator.getitem, (call, 0), like=node, fake_mode=fake_mode)
    out.meta.update({key: value for key, value in node.meta.items() if key not in out.meta})
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return out


def _cannot_take(a: dict, doc: fx.Node | None) -> str | None:
    """Why the kernel cannot take this call (None: it can)."""
    q, k, v = (val(a[n]) for n in ("query", "key", "value"))
    if a["dropout_p"]:
        return "dropout"
    if not q.dim() == k.dim() == v.dim() == 4:
        return "q, k, v are not [B, H, S, D]"
    if not same_size(k.shape[1], v.shape[1]) or (not same_size(k.shape[1], q.shape[1]) and not a["enable_gqa"]):
        return "key/value heads differ from the query heads"
    if size_hint(q.shape[1]) % size_hint(k.shape[1]):
        return "the query heads are not a multiple of the key/value heads"
    if not (same_size(k.shape[-1], q.shape[-1]) and same_size(v.shape[-1], q.shape[-1])):
        return "the value head dim differs from the query's (the kernel takes q, k, v of one shape)"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16, float32)"
    if not same_size(q.shape[2], k.shape[2]):
        return "the query and key lengths differ"
    if doc is None:
        return None
    d = val(doc)
    if not same_size(q.shape[2], d.shape[1]):
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
@dataclass(frozen=True)
class DocumentForm:
    """What a proven mask is: ``(j <= i) & (D[b, i] == D[b, j]) & (i - j < window)``, the ids
    ``D`` (a ``[B, S]`` node; None: one document a row) and the window (None: none)."""

    ids: fx.Node | None
    window: int | None
    positions: fx.Node | None = None  # the positions an order or window was read from (checked at run time)

    def describe(self) -> str:
        parts = (["causal within documents"] if self.ids is not None else []) \
            + ([f"a sliding window of {self.window}"] if self.window is not None else [])
        return " and ".join(parts)


def document_form(mask: fx.Node, memo: dict) -> DocumentForm | None:
    """The mask's ``DocumentForm`` when ``mask`` is provably causal attention inside documents
    and/or inside a sliding window, ``mask[b, h, i, j] = (j <= i) & (D[b, i] == D[b, j]) &
    (i - j < W)``, with ``D`` an int64 cumulative sum of booleans along the sequence (so
    nondecreasing, the kernel's precondition); ``None`` when it cannot be proven, or when it is
    plain causal (pass ``causal_mask``'s). ``memo``: the index algebra's, shared with its other
    calls.

    The mask must be an AND of (``b``, ``i``, ``j`` the batch, query and key indices, proven by
    the index algebra):
      - an order, by index (``j <= i``) or by positions (``P[b, j] <= P[b, i]``);
      - at most one ``D[b, i] == D[b, j]``;
      - windows, by index (``i - j <= W - 1``) or by positions (``P[b, i] - P[b, j] <= W - 1``,
        in any arrangement of the comparison and integer offsets: transformers writes
        ``P[b, j] > P[b, i] - W``); the narrowest is the window;
      - constants True.
    Anything by positions needs ``D = cumsum(diff(P, prepend=one column) != 1)`` of the same
    int64 ``P`` (transformers' packed-sequence ids, made when ``position_ids`` are passed):
    inside a document positions step by exactly one (any other step starts a new document), so
    there ``P[b, i] - P[b, j] = i - j`` and the order and distances of positions are those of
    indices. That holds for positions below 2**40 in magnitude, as the index algebra assumes (no
    step wraps around int64); the pass checks it at run time (``check_positions``, on the stream,
    once per positions tensor). Nothing the proof reads may be written in place afterwards,
    through any alias (``graph_utils.written_in_place``).
    """
    mv = val(mask)
    if not isinstance(mv, torch.Tensor) or mv.dtype != torch.bool or mv.dim() != 4:
        return None
    if any(written_in_place(n) for n in ancestors(mask) | {mask}):
        return None
    batch, seq = mv.shape[0], mv.shape[-1]
    if not same_size(mv.shape[-2], seq):
        return None
    docs: dict[fx.Node, fx.Node] = {}  # the ids' source -> the [B, S] tensor the mask gathers them from
    by_positions: set[fx.Node] = set()  # the positions orders and windows are read from
    windows, ordered = [], False
    for leaf in _conjuncts(mask):
        p = abstract(leaf, memo)
        if isinstance(p, Pred) and p.affine is None and p.const:
            continue  # True
        if is_causal(p, val(leaf)):
            ordered = True
            continue
        window = _index_window(p)
        if window is not None:
            windows.append(window)
            continue
        compared = _compared_gathers(leaf, batch, seq, memo)
        if compared is None:
            return None
        op, (x, source, at, x_off), (_, other, bt, y_off) = compared
        if source is not other:
            return None
        if op == "eq" and {at, bt} == {"q", "kv"} and x_off == y_off == 0:
            docs[source] = x
            continue
        bound = _difference_bound(op, at, x_off, bt, y_off)  # X[first] - X[second] <= c
        if bound == ("kv", "q", 0):
            ordered = True
        elif bound is not None and bound[:2] == ("q", "kv") and bound[2] >= 0:
            windows.append(bound[2] + 1)
        else:
            return None
        by_positions.add(source)
    if len(docs) > 1 or not ordered:
        return None  # two kinds of ids, or no order (both directions: not causal)
    window = min(windows) if windows else None
    if not docs:
        return DocumentForm(None, window) if window is not None and not by_positions else None
    [(source, ids)] = docs.items()
    made_from = _cumsum_of_flags(source)
    if made_from is None:
        return None
    if by_positions:  # read by positions: the ids must be made from those positions' steps
        return DocumentForm(ids, window, made_from) if made_from is not _FLAGS and by_positions == {made_from} \
            else None
    return DocumentForm(ids, window)


def _index_window(p) -> int | None:
    """``W`` when the predicate ``p`` is ``i - j <= W - 1`` over the last two dims (W >= 1)."""
    if not isinstance(p, Pred) or p.affine is None or p.affine.coef[-2:] != (1, -1) or any(p.affine.coef[:-2]):
        return None
    window = 1 - p.affine.const  # i - j + const <= 0
    return window if window >= 1 else None


def _difference_bound(op: str, at: str, x_off: int, bt: str, y_off: int):
    """``X[a] + x_off  op  X[b] + y_off`` as ``(first, second, c)``: ``X[first] - X[second] <= c``
    (integers); None for ``==`` or one index on both sides."""
    if at == bt:
        return None
    if op in ("le", "lt"):  # X[a] - X[b] <= y_off - x_off (- 1)
        return at, bt, y_off - x_off - (op == "lt")
    if op in ("ge", "gt"):  # X[b] - X[a] <= x_off - y_off (- 1)
        return bt, at, x_off - y_off - (op == "gt")
    return None


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
    """``(op, (x, source, "q" | "kv", offset), (...))`` when ``leaf`` compares ``X[b, i] + offset``
    or ``X[b, j] + offset`` of ``[B, S]`` integer tensors (see ``_gathered``; ``offset`` a python
    int added or subtracted); else None."""
    op = COMPARISONS.get(leaf.target) if leaf.op in ("call_function", "call_method") else None
    if op not in ("eq", "le", "lt", "ge", "gt") or len(leaf.args) != 2 or leaf.kwargs:
        return None
    sides = [_offset_gather(a, batch, seq, memo) if isinstance(a, fx.Node) else None for a in leaf.args]
    return None if None in sides else (op, sides[0], sides[1])


def _offset_gather(node: fx.Node, batch, seq, memo):
    """``(x, source, at, offset)`` for ``X[b, i] + offset`` (``_gathered``), ``offset`` a python int."""
    node = _strip_same_values(node)
    offset = 0
    if node.op in ("call_function", "call_method") and node.target in _ADD_SUB and len(node.args) == 2 \
            and not node.kwargs:
        x, y = node.args
        sign = -1 if node.target in _SUB else 1
        if isinstance(x, fx.Node) and isinstance(y, int) and not isinstance(y, bool):
            node, offset = _strip_same_values(x), sign * y
        elif isinstance(y, fx.Node) and isinstance(x, int) and not isinstance(x, bool) and sign == 1:
            node, offset = _strip_same_values(y), x
        else:
            return None
    if abs(offset) >= POSITION_LIMIT:
        return None
    gathered = _gathered(node, batch, seq, memo)
    return None if gathered is None else (*gathered, offset)


_SUB = (operator.sub, torch.sub, "sub")
_ADD_SUB = (operator.add, torch.add, "add") + _SUB


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
