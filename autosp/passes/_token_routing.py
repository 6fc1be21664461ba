"""Layout rules for picking along a dim (``topk``, ``sort``) and the routing region a sort of
token-expert pairs opens (a mixture of experts' dispatch and combine).

``topk`` and ``sort`` along a dim that is not the sequence's keep the layout (the router's top-k
experts of each token). A ``sort`` of the token-expert pairs themselves (``[T * k]``: each
token's k expert ids, flattened, T = B*S tokens) is a sort along the sequence: a rank's sort is
no shard of the global one. But what transformers' grouped experts do with it
(``integrations/moe.py``: ``grouped_mm_experts_forward``) is a permutation that is undone:

    expert_ids_g, perm = torch.sort(expert_ids)          # [T*k]: pairs grouped by expert
    rows_g = hidden[perm // k]                           # each pair's token, in that order
    offsets = cumsum(histc(expert_ids_g.float(), E, 0, E - 1))
    out_g = grouped_mm(rows_g, W, offs=offsets) ...      # row by row: row i by expert(i)
    inv = torch.empty_like(perm); inv[perm] = arange(T*k)
    out = (out_g * weights[perm].unsqueeze(-1))[inv]     # each pair back in place
    final = out.view(T, k, D).sum(1)

Each pair's output row depends only on its own token, its expert id and the (whole) weights:
the group a sorted row falls in is the bin of its own id (histc's bins rise with the id; the
offsets count the ids before them). So a rank that runs the region on its own pairs gets
exactly its shard of the global result: ``routing_region`` proves that structurally, op by op,
and the region runs on local rows with no communication (the fallback gathered every token to
every rank and ran all the experts on the whole sequence).

Inside the region values have the layout ``Rows``: this rank's own pairs in an order of its own
(or a count over them). Such a value is never gathered, cut or returned: it leaves the region
only through the inverse permutation (``x[inv]``), which gives back the sort input's layout.
The proof fails, and the sort takes the fallback as before, when anything else reads the region
(a router statistic over the counts, a returned permuted value), when the permutation is read
other than as an index (``perm // k`` aside), or when the region's work is not row by row (a
per-row value from outside the region, a reduction over rows, an op without a rule here).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from autosp.graph_utils import tensor_inputs
from autosp.layout import FULL, ROWS, SEQ, Layout
from autosp.passes._context import ShardContext, layout_of
from autosp.passes._rule_base import Decision, _arg, _gv, _norm_dim, fallback, replicated

ROW = Layout(ROWS, 0)  # this rank's own rows, in the region's order
COUNT = Layout(ROWS)  # a value over this rank's rows that is not one of them (a count, offsets)


def topk(node: fx.Node, ctx: ShardContext) -> Decision:
    """``topk(x, k, dim)``: values and indices keep the layout where dim is not the sequence's."""
    return _along(node, ctx, _arg(node, 2, "dim", -1), "topk")


def sort(node: fx.Node, ctx: ShardContext) -> Decision:
    """``sort(x, dim)``: as topk along another dim; along a flattened sequence, the routing region."""
    x = node.args[0]
    dim = _arg(node, 1, "dim", -1)
    lay = layout_of(x)
    if isinstance(dim, int) and lay is not None and lay.kind == SEQ and _norm_dim(dim, _gv(x).dim()) == lay.dim:
        found = routing_region(node, ctx)
        if isinstance(found, str):
            return fallback(node, ctx, f"sort along the sequence: {found}")
        own = found.pop(node)
        ctx.decided.update(found)  # the region's other nodes, decided when the sweep reaches them
        return own
    return _along(node, ctx, dim, "sort")


def _along(node: fx.Node, ctx: ShardContext, dim, name: str) -> Decision:
    x = node.args[0]
    lay = layout_of(x)
    whole = replicated(node, ctx)
    if whole is not None:
        return whole
    if lay.kind != SEQ or not isinstance(dim, int):
        return fallback(node, ctx, f"{name} of a value of layout {lay}")
    if _norm_dim(dim, _gv(x).dim()) == lay.dim:
        return fallback(node, ctx, f"{name} along the sequence")
    return Decision(out=(lay, lay))


# ------------------------------------------------------------------------------ the region
def _grouped_mm_targets() -> set:
    targets = {getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None),
               getattr(torch.ops.aten, "_grouped_mm", None)}
    transformers_ops = getattr(torch.ops, "transformers", None)
    if transformers_ops is not None and hasattr(transformers_ops, "grouped_mm_fallback"):
        targets |= {transformers_ops.grouped_mm_fallback, transformers_ops.grouped_mm_fallback.default}
    return targets - {None}


def _is_pointwise(node: fx.Node) -> bool:
    from autosp.passes._rules import RULES, pointwise

    try:
        return RULES.get(node.target) is pointwise
    except TypeError:
        return False


_CASTS = {"to", "float", "int", "long", "type", "half", "bfloat16", "double"}


def routing_region(sort_node: fx.Node, ctx: ShardContext) -> dict[fx.Node, Decision] | str:
    """The decisions of every node of the routing region the sort opens (see the module
    docstring), the sort's own among them; or why the region cannot run on local rows."""
    x = sort_node.args[0]
    lay = layout_of(x)
    xv = _gv(x)
    if xv.dim() != 1 or lay.dim != 0:
        return "not a sort of one flattened dim of token-expert pairs"
    if ctx.dynamic:
        return "the sequence length is symbolic"
    if any(kw not in ("dim", "descending", "stable") for kw in sort_node.kwargs):
        return "a sort with an output argument"
    if len(sort_node.args) > 2:  # sort(x, dim, descending) is fine; nothing longer is written
        return "a sort with more arguments"
    k = lay.inner
    n_global, n_local = xv.numel(), lay.outer * (-(-ctx.seq_len // ctx.world)) * k
    # region node -> "perm", "token" (perm // k), "ids" (sorted ids and casts), "row", "rows" (a
    # tuple of rows), "count", "offsets", "inverse", "setitem"
    kinds: dict[fx.Node, str] = {}
    exits: dict[fx.Node, Decision] = {}
    users = list(sort_node.users)
    if len(users) != 2 or sorted(u.args[1] for u in users if u.target is operator.getitem) != [0, 1]:
        return "the sort's values and indices are not each read once by index"
    for u in users:
        kinds[u] = "ids" if u.args[1] == 0 else "perm"
    order = {n: i for i, n in enumerate(sort_node.graph.nodes)}
    for user in list(sort_node.graph.nodes)[order[sort_node] + 1:]:  # graph order: inputs first
        if user in kinds or not any(n in kinds for n in user.all_input_nodes):
            continue
        kind = _classify(user, kinds, k, lay, n_global, order, ctx)
        if isinstance(kind, str) and kind.startswith("!"):
            return kind[1:]
        if kind is None:
            read = next(n for n in user.all_input_nodes if n in kinds)
            return f"{user.name} ({_name(user)}) reads {read.name} and is not row by row"
        if isinstance(kind, Decision):
            exits[user] = kind
        else:
            kinds[user] = kind
    if not exits:
        return "the permutation is never undone"
    decided: dict[fx.Node, Decision] = {sort_node: Decision(out=(ROW, ROW))}
    for node, kind in kinds.items():
        if kind in ("count", "offsets", "setitem"):
            decided[node] = Decision(out=COUNT)
        elif kind == "rows":
            decided[node] = Decision(out=tuple(ROW for _ in _gv(node)))
        else:
            decided[node] = Decision(out=ROW)
        if kind == "setitem":  # inv[perm] = arange(pairs): this rank's pairs
            arange = node.args[2]
            decided[arange] = Decision(out=ROW, args=(n_local,), kwargs=dict(arange.kwargs))
    decided.update(exits)
    ctx.plan.note(f"{sort_node.name}: tokens routed by a sort of {lay.outer * ctx.seq_len * k} token-expert pairs "
                  f"run on this rank's {n_local} pairs (the permutation is undone at "
                  f"{', '.join(e.name for e in exits)}; nothing gathered)")
    return decided


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _classify(user: fx.Node, kinds: dict, k: int, lay: Layout, n_global: int, order: dict, ctx: ShardContext):
    """The kind of a node that reads the region, an exit's Decision, None (not row by row), or
    "!reason"."""
    t = user.target
    ins = tensor_inputs(user)
    if t is operator.floordiv or (_name(user) == "div" and user.kwargs.get("rounding_mode") == "floor"):
        if len(ins) == 1 and kinds.get(user.args[0]) == "perm" and user.args[1] == k:
            return "token"
        return None
    if t is operator.getitem:
        return _getitem(user, kinds, k, lay, n_global, ctx)
    if t is operator.setitem:
        return "setitem" if kinds.get(user.args[0]) == "inverse" else None
    if (t is torch.empty_like or _name(user) == "empty_like") and kinds.get(user.args[0]) == "perm" \
            and len(ins) == 1:
        return "inverse" if _inverts(user, order, n_global) else \
            "!the inverse permutation is not written as inv[perm] = arange(pairs) before it is read"
    if t in (torch.argsort,) or _name(user) == "argsort":
        return "inverse" if kinds.get(user.args[0]) == "perm" and len(ins) == 1 and not user.kwargs.get("descending") \
            and len(user.args) == 1 else None
    if t in (torch.histc, torch.bincount) or _name(user) in ("histc", "bincount"):
        return "count" if len(ins) == 1 and kinds.get(ins[0]) == "ids" else None
    if t is torch.cumsum or _name(user) == "cumsum":
        dim = _arg(user, 1, "dim", None)
        return "offsets" if len(ins) == 1 and kinds.get(ins[0]) == "count" and dim in (0, -1) else None
    if t in _grouped_mm_targets():
        rows, weight = user.args[0], user.args[1]
        offs = user.kwargs.get("offs", user.args[2] if len(user.args) > 2 else None)
        ok = (kinds.get(rows) == "row" and weight not in kinds and _whole(weight, ctx)
              and kinds.get(offs) == "offsets" and not user.kwargs.keys() - {"offs", "bias", "out_dtype"}
              and (user.kwargs.get("bias") is None))
        return "row" if ok else None
    if _name(user) in ("chunk", "split") and kinds.get(user.args[0]) in ("row", "ids"):
        dim = _arg(user, 2, "dim", 0)
        return "rows" if len(ins) == 1 and isinstance(dim, int) and _norm_dim(dim, _gv(user.args[0]).dim()) != 0 \
            else None
    if _name(user) == "unsqueeze" and kinds.get(user.args[0]) in ("row", "ids"):
        dim = _arg(user, 1, "dim", None)
        return kinds[user.args[0]] if isinstance(dim, int) and _norm_dim(dim, _gv(user).dim()) != 0 else None
    if _is_pointwise(user) and t not in _POSITIONAL:
        return _pointwise(user, kinds, ctx)
    if isinstance(t, str) and t.endswith("_") and not t.startswith("_") and t[:-1] in _IN_PLACE_OK \
            and user.args and user.args[0] in kinds:  # clamp_, masked_fill_: written in place, row by row
        kind = _pointwise(user, kinds, ctx)
        return kinds[user.args[0]] if kind is not None and kinds[user.args[0]] in ("row", "ids") else None
    return None


# in-place forms of elementwise methods the rule table does not list (transformers <= 5.17 clamps
# the sorted ids in place; masked_fill_, add_, mul_ are in the table): the written value keeps its kind
_IN_PLACE_OK = {"clamp", "clamp_min", "clamp_max", "fill"}


# elementwise ops whose result depends on the position or on random numbers: not row by row here
_POSITIONAL = {torch.tril, torch.triu, F.dropout, "tril", "triu", "dropout"}


def _layout(node: fx.Node, ctx: ShardContext) -> Layout:
    """The layout of a value from outside the region; one the sweep has not reached yet (made
    after the sort: the experts' weights transposed, the routing weights flattened) is given its
    layout now (it reads nothing of the region, or it would be in it)."""
    if layout_of(node) is None:
        ctx.visit(node)
    return layout_of(node)


def _whole(node: fx.Node, ctx: ShardContext) -> bool:
    return _layout(node, ctx).kind == FULL


def _inverts(slots: fx.Node, order: dict, n: int) -> bool:
    """Whether ``slots`` (``empty_like(perm)``) is made the inverse permutation by one
    ``slots[perm] = arange(n)`` before anything else reads it; the arange, made after the sort
    and read by nothing else, is rewritten to this rank's count of pairs."""
    setters = [u for u in slots.users if u.target is operator.setitem]
    if len(setters) != 1:
        return False
    setter = setters[0]
    _, index, value = setter.args
    perm = slots.args[0]
    return index is perm and isinstance(value, fx.Node) and value.target is torch.arange and value.args == (n,) \
        and len(value.users) == 1 and not value.kwargs.keys() - {"device", "dtype"} \
        and order[value] > order[perm] and all(order[u] > order[setter] for u in slots.users if u is not setter)


def _pointwise(user: fx.Node, kinds: dict, ctx: ShardContext):
    """Elementwise over region rows, with whole values that do not vary along the rows."""
    out = _gv(user)
    if not isinstance(out, torch.Tensor):
        return None
    region_kinds = {kinds[n] for n in tensor_inputs(user) if n in kinds}
    if not region_kinds <= {"row", "ids"}:
        return None
    for n in tensor_inputs(user):
        if n in kinds:
            if _gv(n).shape[:1] != out.shape[:1]:
                return None
            continue
        v = _gv(n)
        if not _whole(n, ctx) or (v.dim() >= out.dim() and v.shape[0] != 1):
            return None  # a value per row from outside the region
    # a cast of the ids stays ids (histc reads a cast of them); any other work makes rows
    if region_kinds == {"ids"} and _name(user) in _CASTS and len(tensor_inputs(user)) == 1:
        return "ids"
    return "row"


def _getitem(user: fx.Node, kinds: dict, k: int, lay: Layout, n_global: int, ctx: ShardContext):
    x, index = user.args
    if x in kinds and kinds[x] == "rows" and isinstance(index, int):  # a chunk's part
        return "row"
    if not isinstance(index, fx.Node) or index not in kinds:
        return None
    idx = kinds[index]
    xv = _gv(x)
    if x in kinds:
        if kinds[x] in ("row", "ids") and idx == "inverse" and xv.shape[0] == n_global:
            return Decision(out=lay)  # each pair back in place: the sort input's layout
        return None
    xl = _layout(x, ctx)
    if idx == "perm" and xl.kind == SEQ and xl.dim == 0 and (xl.outer, xl.inner) == (lay.outer, lay.inner) \
            and xv.shape[0] == n_global:
        return "row"  # a value per pair (the routing weights), in the region's order
    if idx == "token" and xl.kind == SEQ and xl.dim == 0 and (xl.outer, xl.inner) == (lay.outer, 1) \
            and xv.shape[0] * k == n_global:
        return "row"  # each pair's token
    if idx == "ids" and xl.kind == FULL and xl.dim is None:
        return "row"  # a whole table indexed by each pair's expert (a bias per expert)
    return None
