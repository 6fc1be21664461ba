"""causal_mask: an attention mask that is provably the causal mask becomes ``is_causal=True``.

Under ``torch.compile`` Hugging Face models build the causal mask as a tensor (transformers
cannot skip it while tracing) and call SDPA with ``attn_mask=mask, is_causal=False``. The
mask is ``[B, 1, S, S]`` booleans (4 GiB at S = 64K) and it costs the fast kernels: cuDNN with
a dense mask ran at a quarter of its causal rate on H200. This pass proves, from the graph
alone, that a mask is ``mask[..., i, j] = (j <= i)`` and then calls SDPA with ``is_causal=True``
and no mask; the mask's nodes become dead code. Exact: nothing is guessed, and a mask that is
anything else (padding, a sliding window, data from an input) is left as it was.

Before::

    q_idx = arange(S)[None, None, :, None]; kv_idx = arange(S)[None, None, None, :]
    mask = (kv_idx <= q_idx).expand(B, -1, S, S)
    o = sdpa(q, k, v, attn_mask=mask, is_causal=False)

After::

    o = sdpa(q, k, v, is_causal=True)

The proof is an abstract interpretation of the mask's ancestors. Every integer tensor is an
affine function of its own indices (``Affine``: ``value[idx] = const + sum(coef[d] * idx[d])``:
``arange`` and everything built from it by broadcasting, slicing, gathering with such index
tensors, adding constants, ``diff`` and ``cumsum`` of constants); every boolean is a constant or
``affine <= 0``. Any other op, or a graph input, makes the value unknown and the mask is kept.
The causal mask is ``j - i <= 0`` over the last two dims and nothing else. SDPA's ``is_causal``
is the upper-left causal mask, the same predicate, for any query and key lengths.

A mask that is kept gets a note with the bytes it is built in on every rank. A mask proven
causal *within documents* (``document_ids`` below: transformers' packed-sequence mask, made
when ``position_ids`` are passed) is marked on its SDPA call for ``document_mask``, which runs
it as document attention after ``shard_sequence``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from autosp._torch_private import same_size, size_hint
from autosp.graph_utils import eliminate_dead_code, human_bytes, val, written_in_place
from autosp.passes._attention import SDPA_TARGETS, sdpa_args


@dataclass(frozen=True)
class Affine:
    """An integer tensor with ``value[idx] = const + sum(coef[d] * idx[d])``."""

    coef: tuple[int, ...]  # one per dim of the tensor; 0 on dims of size 1
    const: int


@dataclass(frozen=True)
class Pred:
    """A boolean tensor: ``affine <= 0`` elementwise, or a constant (``affine is None``)."""

    affine: Affine | None
    const: bool = True


UNKNOWN = None
_KEEP_VALUE = {"to", "contiguous", "clone", "long", "int"}
DOCUMENT_MASK = "autosp.document_mask"  # on SDPA calls: their mask is proven causal within documents


def causal_mask_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Replace masks proven causal by ``is_causal=True``."""
    plan = gm.meta["autosp.plan"]
    memo: dict[fx.Node, object] = {}
    changed = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        a = sdpa_args(node)
        mask = a["attn_mask"]
        if not isinstance(mask, fx.Node) or a["is_causal"]:
            continue
        if not _is_causal(_abstract(mask, memo), val(mask)):
            if document_ids(mask, memo) is None:
                plan.note(_kept_note(node, mask))
            else:  # pass document_mask rewrites it, or says why not
                node.meta[DOCUMENT_MASK] = True
            continue
        args = list(node.args)
        kwargs = dict(node.kwargs)
        if len(args) > 3:
            args[3] = None
        else:
            kwargs["attn_mask"] = None
        if len(args) > 5:
            args[5] = True
        else:
            kwargs["is_causal"] = True
        node.args, node.kwargs = tuple(args), kwargs
        changed.append(node.name)
    if changed:
        eliminate_dead_code(gm.graph)
        gm.recompile()
        plan.note(f"attention mask proven causal: {', '.join(changed)} run with is_causal=True (the mask is never built)")
    return gm


def _kept_note(sdpa: fx.Node, mask: fx.Node) -> str:
    """What keeping ``mask`` costs."""
    v = val(mask)
    if not isinstance(v, torch.Tensor):
        return f"{sdpa.name}: its attention mask is not provably causal and is kept"
    # The bytes behind the mask: broadcast (stride 0) dims are stored once.
    sizes, strides = [size_hint(n) for n in v.shape], [size_hint(st) for st in v.stride()]  # dynamic: the hints
    stored = (1 + sum((n - 1) * st for n, st in zip(sizes, strides, strict=True) if st > 0)) * v.element_size()
    text = (f"{sdpa.name}: its attention mask is not provably causal and is kept: "
            f"[{', '.join(map(str, v.shape))}] {str(v.dtype).removeprefix('torch.')}, {human_bytes(stored)} built on "
            "every rank (the whole sequence's, also under sequence parallelism), and SDPA's cuDNN and flash "
            "kernels take no mask")
    return text


def _is_causal(p, mask_val) -> bool:
    if not isinstance(p, Pred) or p.affine is None or not isinstance(mask_val, torch.Tensor):
        return False
    if mask_val.dtype != torch.bool or mask_val.dim() < 2:
        return False
    coef = p.affine.coef
    return coef[-2:] == (-1, 1) and not any(coef[:-2]) and p.affine.const == 0


# ----------------------------------------------------------------------------- the interpreter
def _abstract(node, memo):
    """The abstract value of ``node`` (an int/bool python constant, ``Affine``, ``Pred`` or UNKNOWN)."""
    if not isinstance(node, fx.Node):
        if isinstance(node, bool):
            return Pred(None, node)
        return node if isinstance(node, int) else UNKNOWN
    if node not in memo:
        memo[node] = UNKNOWN  # cycles cannot happen in a graph; this guards re-entry
        value = _eval(node, memo)
        if value is not UNKNOWN and (written_in_place(node) or not _small(value)):
            value = UNKNOWN
        memo[node] = value
    return memo[node]


_LIMIT = 1 << 40  # |const| and |coef| * positions stay far below int64's range


def _small(value) -> bool:
    """Constants small enough that no intermediate can overflow int64 (positions < 2**40)."""
    a = value.affine if isinstance(value, Pred) else value
    if not isinstance(a, Affine):
        return True
    return abs(a.const) < _LIMIT and all(abs(c) < (1 << 16) for c in a.coef)


def _shape(node) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _eval(node: fx.Node, memo):  # noqa: C901 - one branch per op family, each a few lines
    if node.op not in ("call_function", "call_method"):
        return UNKNOWN
    shape = _shape(node)
    if shape is None:
        return UNKNOWN
    t, args, kw = node.target, node.args, node.kwargs
    A = lambda x: _abstract(x, memo)  # noqa: E731

    if t is torch.arange:
        return _arange(args, kw, shape) if val(node).dtype == torch.int64 else UNKNOWN  # narrow types wrap
    if (t == "new_ones" or t is torch.ones) and val(node).dtype == torch.bool:
        return Pred(None, True)
    if t in _KEEP_VALUE or t == "expand" or t in ("unsqueeze", "view", "reshape") or t is torch.unsqueeze:
        if t in _KEEP_VALUE and not _same_kind(val(args[0]).dtype, val(node).dtype):
            return UNKNOWN
        return _restride(A(args[0]), _shape(args[0]), shape)
    if t is operator.getitem:
        return _getitem(A(args[0]), args[0], args[1], shape, memo)
    if t in (operator.add, torch.add, "add", operator.sub, torch.sub, "sub"):
        if kw.get("alpha", 1) != 1 or len(args) != 2:
            return UNKNOWN  # x + alpha * y: not handled
        x, y = A(args[0]), A(args[1])
        sign = -1 if t in (operator.sub, torch.sub, "sub") else 1
        return _linear(x, _shape(args[0]), y, _shape(args[1]), sign, shape)
    if t in (torch.diff, "diff"):
        return _diff(node, memo, shape)
    if t in (torch.cumsum, "cumsum"):
        x = A(args[0])
        dim = kw.get("dim", args[1] if len(args) > 1 else None)
        x = _as_affine(x, len(shape))
        if not isinstance(x, Affine) or any(x.coef) or not isinstance(dim, int):
            return UNKNOWN
        coef = [0] * len(shape)
        coef[dim % len(shape)] = x.const
        return _normalize(Affine(tuple(coef), x.const), shape)
    cmp = _COMPARISONS.get(t)
    if cmp is not None:
        diff = _linear(A(args[0]), _shape(args[0]), A(args[1]), _shape(args[1]), -1, shape)
        return _compare(diff, cmp)
    if t in (operator.and_, torch.logical_and, torch.bitwise_and, "logical_and", "bitwise_and", "__and__"):
        x, y = A(args[0]), A(args[1])
        for p, q, q_node in ((x, y, args[1]), (y, x, args[0])):
            if isinstance(p, Pred) and p.affine is None:
                if not p.const:
                    return Pred(None, False)
                return _restride(q, _shape(q_node), shape) if isinstance(q, Pred) else UNKNOWN
        return UNKNOWN
    return UNKNOWN


# Each comparison as a function, a tensor method and a dunder method (torch 2.11's Dynamo records
# transformers' ``a == b`` on tensors as ``a.__eq__(b)``; 2.13's as ``operator.eq``).
_COMPARISONS = {
    fn: name
    for name in ("le", "lt", "ge", "gt", "eq", "ne")
    for fn in (getattr(operator, name), getattr(torch, name), name, f"__{name}__")
}


def _same_kind(a: torch.dtype, b: torch.dtype) -> bool:
    """A cast that keeps every value: the same dtype, or an integer type widened to int64."""
    return a == b or (b == torch.int64 and a in (torch.int32, torch.int16, torch.int8, torch.uint8))


def _arange(args, kw, shape):
    nums = list(args) + [kw[k] for k in ("start", "end", "step") if k in kw]
    if not all(isinstance(n, (int, torch.SymInt)) for n in nums) or len(shape) != 1:
        return UNKNOWN
    if "end" in kw or len(args) >= 2:
        start = args[0] if args else kw.get("start", 0)
        step = args[2] if len(args) > 2 else kw.get("step", 1)
    else:
        start, step = kw.get("start", 0), kw.get("step", 1)
    if not isinstance(start, int) or not isinstance(step, int):
        return UNKNOWN
    return _normalize(Affine((step,), start), shape)


def _is_one(size) -> bool:
    return isinstance(size, int) and size == 1


def _normalize(x: Affine, shape) -> Affine:
    return Affine(tuple(0 if _is_one(s) else c for s, c in zip(shape, x.coef, strict=True)), x.const)


def _as_affine(x, ndim: int):
    """Python ints and constant predicates as constant tensors of ``ndim`` dims."""
    if isinstance(x, Pred) and x.affine is None:
        return Affine((0,) * ndim, int(x.const))
    if isinstance(x, int):
        return Affine((0,) * ndim, x)
    return x


def _broadcast(x: Affine, from_shape, to_shape) -> Affine | None:
    """``x`` right-aligned into ``to_shape`` (new leading dims and size-1 dims get coefficient 0)."""
    lead = len(to_shape) - len(from_shape)
    if lead < 0:
        return None
    return _normalize(Affine((0,) * lead + x.coef, x.const), to_shape)


def _linear(x, xs, y, ys, sign, shape):
    """``x + sign * y`` with broadcasting; python ints are scalars."""
    x, y = _as_affine(x, len(xs or ())), _as_affine(y, len(ys or ()))
    if not isinstance(x, Affine) or not isinstance(y, Affine):
        return UNKNOWN
    bx, by = _broadcast(x, xs or (), shape), _broadcast(y, ys or (), shape)
    if bx is None or by is None:
        return UNKNOWN
    return Affine(tuple(a + sign * b for a, b in zip(bx.coef, by.coef, strict=True)), bx.const + sign * by.const)


def _compare(diff, op: str):
    """``x op y`` given ``diff = x - y``, as ``affine <= 0`` (integers: ``x < y`` is ``x - y + 1 <= 0``)."""
    if not isinstance(diff, Affine):
        return UNKNOWN
    if not any(diff.coef):
        c = diff.const
        return Pred(None, {"le": c <= 0, "lt": c < 0, "ge": c >= 0, "gt": c > 0, "eq": c == 0, "ne": c != 0}[op])
    neg = Affine(tuple(-c for c in diff.coef), -diff.const)
    if op == "le":
        return Pred(diff)
    if op == "lt":
        return Pred(Affine(diff.coef, diff.const + 1))
    if op == "ge":
        return Pred(neg)
    if op == "gt":
        return Pred(Affine(neg.coef, neg.const + 1))
    return UNKNOWN  # eq / ne of non-constants: not a half-plane


def _restride(x, from_shape, to_shape):
    """Same values, dims of size 1 added, removed or expanded (view, unsqueeze, expand)."""
    if isinstance(x, Pred):
        if x.affine is None:
            return x
        inner = _restride(x.affine, from_shape, to_shape)
        return Pred(inner) if isinstance(inner, Affine) else UNKNOWN
    if not isinstance(x, Affine) or from_shape is None:
        return UNKNOWN
    big_from = [(s, c) for s, c in zip(from_shape, x.coef, strict=True) if not _is_one(s)]
    big_to = [i for i, s in enumerate(to_shape) if not _is_one(s)]
    if len(big_to) < len(big_from):
        return UNKNOWN
    # Dims of size > 1 keep their order; expanded dims (new size > 1 from size 1) get coefficient 0.
    coef = [0] * len(to_shape)
    if len(big_from) == len(big_to):
        for (s, c), i in zip(big_from, big_to, strict=True):
            if not same_size(s, to_shape[i]):
                return UNKNOWN
            coef[i] = c
        return Affine(tuple(coef), x.const)
    if len(from_shape) != len(to_shape):
        return UNKNOWN  # an expand that also adds dims: align right and check sizes
    for i, (s, c) in enumerate(zip(from_shape, x.coef, strict=True)):
        if not _is_one(s):
            if not same_size(s, to_shape[i]):
                return UNKNOWN
            coef[i] = c
    return Affine(tuple(coef), x.const)


def _getitem(x, x_node, index, shape, memo):
    """Basic indexing (None, full or offset slices, ints, Ellipsis) and gathers by affine index tensors."""
    xs = _shape(x_node)
    if xs is None:
        return UNKNOWN
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, fx.Node) for i in index):
        return _gather(x, xs, index, shape, memo)
    if isinstance(x, Pred):
        if x.affine is None:
            return x
        inner = _getitem(x.affine, x_node, index, shape, memo)
        return Pred(inner) if isinstance(inner, Affine) else UNKNOWN
    if not isinstance(x, Affine):
        return UNKNOWN
    coef, const, d = [], x.const, 0
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    for i in index:
        if i is None:
            coef.append(0)
        elif i is Ellipsis:
            for _ in range(len(xs) - n_real):
                coef.append(x.coef[d])
                d += 1
        elif isinstance(i, bool):
            return UNKNOWN  # a bool index adds a dim in torch
        elif isinstance(i, int):
            if i < 0:
                return UNKNOWN
            const += x.coef[d] * i
            d += 1
        elif isinstance(i, slice):
            start, step = i.start or 0, i.step or 1
            if not isinstance(start, int) or not isinstance(step, int) or start < 0:
                return UNKNOWN
            const += x.coef[d] * start
            coef.append(x.coef[d] * step)
            d += 1
        else:
            return UNKNOWN
    coef += list(x.coef[d:])
    if len(coef) != len(shape):
        return UNKNOWN
    return _normalize(Affine(tuple(coef), const), shape)


def _gather(x, xs, index, shape, memo):
    """``x[i0, i1, ...]`` with one affine index tensor per leading dim of ``x`` (advanced indexing)."""
    if not all(isinstance(i, fx.Node) for i in index) or len(index) > len(xs):
        return UNKNOWN
    if isinstance(x, Pred) and x.affine is None:
        return x
    x = _as_affine(x, len(xs))
    if not isinstance(x, Affine):
        return UNKNOWN
    rest = len(xs) - len(index)
    lead_shape = shape[: len(shape) - rest]
    coef, const = [0] * len(lead_shape), x.const
    for d, i_node in enumerate(index):
        i = _abstract(i_node, memo)
        bi = _broadcast(i, _shape(i_node), lead_shape) if isinstance(i, Affine) else None
        if bi is None or bi.const < 0 or any(c < 0 for c in bi.coef):
            return UNKNOWN  # a negative index wraps around: not affine any more
        coef = [a + x.coef[d] * b for a, b in zip(coef, bi.coef, strict=True)]
        const += x.coef[d] * bi.const
    return _normalize(Affine(tuple(coef) + x.coef[len(index):], const), shape)


def _diff(node: fx.Node, memo, shape):
    """``diff(x, dim, prepend=p)``: constant ``k`` when ``x`` steps by ``k`` along ``dim`` and ``p`` is one step before."""
    names = ("input", "n", "dim", "prepend", "append")
    a = dict(zip(names, node.args, strict=False))
    a.update(node.kwargs)
    if a.get("n", 1) != 1 or a.get("append") is not None or not isinstance(a.get("dim", -1), int):
        return UNKNOWN
    x, xs = _abstract(a["input"], memo), _shape(a["input"])
    if not isinstance(x, Affine) or xs is None:
        return UNKNOWN
    dim = a.get("dim", -1) % len(xs)
    k = x.coef[dim]
    if a.get("prepend") is not None:
        p, ps = _abstract(a["prepend"], memo), _shape(a["prepend"])
        p = _broadcast(p, ps, xs[:dim] + (1,) + xs[dim + 1:]) if isinstance(p, Affine) and ps is not None else None
        if p is None:
            return UNKNOWN
        other = tuple(c for i, c in enumerate(x.coef) if i != dim)
        if tuple(c for i, c in enumerate(p.coef) if i != dim) != other or x.const - p.const != k:
            return UNKNOWN
    return Affine((0,) * len(shape), k)


# ----------------------------------------------------------------------------- document masks
_AND = (operator.and_, torch.logical_and, torch.bitwise_and, "logical_and", "bitwise_and", "__and__")
_SAME_VALUES = ("contiguous", "clone")


def document_ids(mask: fx.Node, memo: dict) -> fx.Node | None:
    """The ``[B, S]`` document ids ``D`` when ``mask`` is provably causal attention inside
    documents, ``mask[b, h, i, j] = (j <= i) & (D[b, i] == D[b, j])``, with ``D`` nondecreasing
    along the sequence; ``None`` when it cannot be proven.

    This is transformers' packed-sequence mask (``position_ids`` given, no ``attention_mask``):
    ``D = cumsum(diff(P) != 1)`` of the positions ``P``, and the order compared is that of the
    positions, ``P[b, j] <= P[b, i]``. Inside a document positions step by exactly one (a step
    of anything else starts a new document), so there the order of positions is the order of
    indices: the mask is the one above. The order may also be by index (``j <= i``, proven as
    for the causal mask) with ``D`` any cumulative sum of flags.
    """
    mv = val(mask)
    if not isinstance(mv, torch.Tensor) or mv.dtype != torch.bool or mv.dim() != 4:
        return None
    if any(written_in_place(n) for n in _ancestors(mask) | {mask}):
        return None  # the proof reads values as their ops made them: nothing may write into them later
    batch, seq = mv.shape[0], mv.shape[-1]
    if not same_size(mv.shape[-2], seq):
        return None
    docs, position_orders, index_order = set(), set(), False
    for leaf in _conjuncts(mask):
        p = _abstract(leaf, memo)
        if isinstance(p, Pred) and p.affine is None and p.const:
            continue  # True
        if _is_causal(p, val(leaf)):
            index_order = True
            continue
        compared = _compared_gathers(leaf, batch, seq, memo)
        if compared is None:
            return None
        op, (a, at), (b, bt) = compared
        if a is not b:
            return None
        if op == "eq" and {at, bt} == {"q", "kv"}:
            docs.add(a)
        elif (op, at, bt) in (("le", "kv", "q"), ("ge", "q", "kv")):
            position_orders.add(a)
        else:
            return None
    if len(docs) != 1:
        return None
    [doc] = docs
    positions = _stepped_positions(doc)
    if positions is None or (position_orders and position_orders != {positions}):
        return None
    if not (index_order or position_orders):
        return None  # documents without an order: not causal
    return doc


_CUMSUM_OF_FLAGS = object()  # D is a cumulative sum of flags not made from positions


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
    if node.op in ("call_function", "call_method") and node.target in _AND and len(node.args) == 2 \
            and all(isinstance(a, fx.Node) for a in node.args) and not node.kwargs:
        return _conjuncts(node.args[0]) + _conjuncts(node.args[1])
    return [node]


def _strip_same_values(node: fx.Node) -> fx.Node:
    """Through ``.to`` (same dtype), ``contiguous``, ``clone`` and ``expand`` (broadcast only)."""
    while node.op in ("call_method", "call_function") and node.args and isinstance(node.args[0], fx.Node):
        t, src = node.target, node.args[0]
        if t in _SAME_VALUES or t == "expand" or (t == "to" and val(src) is not None
                                                   and getattr(val(src), "dtype", None) == val(node).dtype):
            node = src
            continue
        break
    return node


def _compared_gathers(leaf: fx.Node, batch, seq, memo):
    """``(op, (base, "q" | "kv"), (base, "q" | "kv"))`` when ``leaf`` compares ``X[b, i]`` or
    ``X[b, j]`` of ``[B, S]`` integer tensors (``b``, ``i``, ``j`` the mask's batch, query and
    key indices); else None."""
    op = _COMPARISONS.get(leaf.target) if leaf.op in ("call_function", "call_method") else None
    if op not in ("eq", "le", "ge") or len(leaf.args) != 2 or leaf.kwargs:
        return None
    sides = [_gathered(_strip_same_values(a), batch, seq, memo) if isinstance(a, fx.Node) else None
             for a in leaf.args]
    return None if None in sides else (op, sides[0], sides[1])


def _gathered(node: fx.Node, batch, seq, memo):
    """``(base, "q" | "kv")`` when ``node`` is ``X[b_idx, i_idx]`` with ``X`` of shape ``[B, S]``,
    ``b_idx`` the batch index ``b`` and ``i_idx`` the query index ``i`` or key index ``j`` of a
    4-D ``[B, 1, Sq, Sk]`` mask."""
    if node.target is not operator.getitem or not isinstance(node.args[1], tuple) or len(node.args[1]) != 2:
        return None
    x, (b_idx, i_idx) = node.args[0], node.args[1]
    xv = val(x)
    if not isinstance(x, fx.Node) or not isinstance(xv, torch.Tensor) or xv.dim() != 2 \
            or xv.is_floating_point() or not (same_size(xv.shape[0], batch) and same_size(xv.shape[1], seq)):
        return None
    b, i = _abstract(b_idx, memo), _abstract(i_idx, memo)
    if not (isinstance(b, Affine) and isinstance(i, Affine) and len(b.coef) == 4 and len(i.coef) == 4):
        return None
    b_ok = b.const == 0 and b.coef[1:] == (0, 0, 0) and (b.coef[0] == 1 or _is_one(batch)) \
        and same_size(val(b_idx).shape[0], batch)
    if not b_ok or i.const != 0:
        return None
    # The tensor gathered from is named by its source through broadcasts and casts: two [B, S]
    # tensors broadcast from one source hold the same values (transformers expands the
    # positions of a batch of one twice, once for the ids, once for the order).
    if i.coef == (0, 0, 1, 0) and same_size(val(i_idx).shape[2], seq):
        return _strip_same_values(x), "q"
    if i.coef == (0, 0, 0, 1) and same_size(val(i_idx).shape[3], seq):
        return _strip_same_values(x), "kv"
    return None


def _stepped_positions(doc: fx.Node):
    """``P`` when ``doc = cumsum(diff(P) != 1)`` along the sequence; ``_CUMSUM_OF_FLAGS`` when
    ``doc`` is another cumulative sum of booleans along it; None otherwise."""
    if doc.target not in (torch.cumsum, "cumsum"):
        return None
    dim = doc.kwargs.get("dim", doc.args[1] if len(doc.args) > 1 else None)
    flags = doc.args[0]
    if dim not in (-1, 1) or doc.kwargs.get("dtype") is not None or not isinstance(flags, fx.Node) \
            or val(flags).dtype != torch.bool:
        return None
    if _COMPARISONS.get(flags.target) != "ne" or len(flags.args) != 2 or flags.args[1] != 1:
        return _CUMSUM_OF_FLAGS
    step = flags.args[0]
    if not isinstance(step, fx.Node) or step.target not in (torch.diff, "diff"):
        return _CUMSUM_OF_FLAGS
    names = ("input", "n", "dim", "prepend", "append")
    a = dict(zip(names, step.args, strict=False))
    a.update(step.kwargs)
    if a.get("n", 1) != 1 or a.get("append") is not None or a.get("dim", -1) not in (-1, 1) \
            or not isinstance(a["input"], fx.Node):
        return _CUMSUM_OF_FLAGS
    return _strip_same_values(a["input"])
