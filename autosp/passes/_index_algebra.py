"""Index algebra: what an integer or boolean tensor of a graph is, as a function of its indices.

The proofs of ``causal_mask`` and ``document_mask`` read masks through this abstract
interpretation of their ancestors. Every integer tensor it knows is an affine function of its
own indices (``Affine``: ``value[idx] = const + sum(coef[d] * idx[d])``: ``arange`` and
everything built from it by broadcasting, slicing, gathering with such index tensors, adding
constants, ``diff`` and int64 ``cumsum`` of constants); every boolean is a constant or
``affine <= 0`` (``Pred``). Any other op, a graph input, or a value some op writes into in place
is ``UNKNOWN``. Positions are assumed below 2**40 (``POSITION_LIMIT``): nothing computed here may
overflow int64.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from autosp._torch_private import same_size
from autosp.graph_utils import val, written_in_place


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


def is_causal(p, mask_val) -> bool:
    """Whether the abstract value ``p`` of the boolean tensor ``mask_val`` is ``j - i <= 0`` over its
    last two dims (``j`` the key, ``i`` the query index) and nothing else: the causal mask."""
    if not isinstance(p, Pred) or p.affine is None or not isinstance(mask_val, torch.Tensor):
        return False
    if mask_val.dtype != torch.bool or mask_val.dim() < 2:
        return False
    coef = p.affine.coef
    return coef[-2:] == (-1, 1) and not any(coef[:-2]) and p.affine.const == 0


def abstract(node, memo):
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


POSITION_LIMIT = 1 << 40  # |const| and |coef| * positions stay far below int64's range


def _small(value) -> bool:
    """Constants small enough that no intermediate can overflow int64 (positions < 2**40)."""
    a = value.affine if isinstance(value, Pred) else value
    if not isinstance(a, Affine):
        return True
    return abs(a.const) < POSITION_LIMIT and all(abs(c) < (1 << 16) for c in a.coef)


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
    A = lambda x: abstract(x, memo)  # noqa: E731

    if t is torch.arange:
        return _arange(args, kw, shape) if val(node).dtype == torch.int64 else UNKNOWN  # narrow types wrap
    if (t == "new_ones" or t is torch.ones) and val(node).dtype == torch.bool:
        return Pred(None, True)
    if t in _KEEP_VALUE or t == "expand" or t in ("unsqueeze", "view", "reshape") or t is torch.unsqueeze:
        if t in _KEEP_VALUE and not _same_kind(val(args[0]).dtype, val(node).dtype):
            return UNKNOWN
        if val(args[0]).dtype != val(node).dtype and t not in _KEEP_VALUE:
            return UNKNOWN  # x.view(dtype) reinterprets the bits: not the same values
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
        if val(node).dtype != torch.int64:
            return UNKNOWN  # a narrower result wraps around
        x = A(args[0])
        dim = kw.get("dim", args[1] if len(args) > 1 else None)
        x = _as_affine(x, len(shape))
        if not isinstance(x, Affine) or any(x.coef) or not isinstance(dim, int):
            return UNKNOWN
        coef = [0] * len(shape)
        coef[dim % len(shape)] = x.const
        return _normalize(Affine(tuple(coef), x.const), shape)
    cmp = COMPARISONS.get(t)
    if cmp is not None:
        diff = _linear(A(args[0]), _shape(args[0]), A(args[1]), _shape(args[1]), -1, shape)
        return _compare(diff, cmp)
    if t in AND_OPS:
        x, y = A(args[0]), A(args[1])
        for p, q, q_node in ((x, y, args[1]), (y, x, args[0])):
            if isinstance(p, Pred) and p.affine is None:
                if not p.const:
                    return Pred(None, False)
                return _restride(q, _shape(q_node), shape) if isinstance(q, Pred) else UNKNOWN
        return UNKNOWN
    return UNKNOWN


AND_OPS = (operator.and_, torch.logical_and, torch.bitwise_and, "logical_and", "bitwise_and", "__and__")

# Each comparison as a function, a tensor method and a dunder method (torch 2.11's Dynamo records
# transformers' ``a == b`` on tensors as ``a.__eq__(b)``; 2.13's as ``operator.eq``).
COMPARISONS = {
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


def is_one(size) -> bool:
    return isinstance(size, int) and size == 1


def _normalize(x: Affine, shape) -> Affine:
    return Affine(tuple(0 if is_one(s) else c for s, c in zip(shape, x.coef, strict=True)), x.const)


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
    big_from = [(s, c) for s, c in zip(from_shape, x.coef, strict=True) if not is_one(s)]
    big_to = [i for i, s in enumerate(to_shape) if not is_one(s)]
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
        if not is_one(s):
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
        i = abstract(i_node, memo)
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
    x, xs = abstract(a["input"], memo), _shape(a["input"])
    if not isinstance(x, Affine) or xs is None:
        return UNKNOWN
    dim = a.get("dim", -1) % len(xs)
    k = x.coef[dim]
    if a.get("prepend") is not None:
        p, ps = abstract(a["prepend"], memo), _shape(a["prepend"])
        if ps is None or len(ps) != len(xs) or not is_one(ps[dim]):
            return UNKNOWN  # one column prepended, no more (a wider one is not "one step before")
        p = _broadcast(p, ps, xs[:dim] + (1,) + xs[dim + 1:]) if isinstance(p, Affine) else None
        if p is None:
            return UNKNOWN
        other = tuple(c for i, c in enumerate(x.coef) if i != dim)
        if tuple(c for i, c in enumerate(p.coef) if i != dim) != other or x.const - p.const != k:
            return UNKNOWN
    return Affine((0,) * len(shape), k)
