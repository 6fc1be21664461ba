"""Layout rules: for each op, the layout of its output and the layouts it needs of its inputs.

A rule is ``rule(node, ctx) -> Decision`` (``_rule_base``). It reads the *global* shapes of the
values (``global_val``: what one device would see) and the layouts the sweep has given the
inputs. An op with no rule, or a case a rule cannot prove, gets ``fallback``: every input made
``Full`` (gathered), the op run on whole values, a line in the plan. Never a guess.

This file: elementwise ops, token-wise ops (linear, embedding, norms), reductions, the loss,
and ``RULES``, the table of every rule; shape ops are in ``_shape_rules``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from autosp.graph_utils import tensor_inputs
from autosp.layout import FULL, PARTIAL, PARTIAL_SUM, SEQ, Layout, full, seq
from autosp.passes._context import ShardContext, layout_of
from autosp.passes._rule_base import (
    Decision,
    _arg,
    _gv,
    _is_float,
    _norm_dim,
    fallback,
    guess_seq_dim,
    replicated,
)
from autosp.passes._shape_rules import (
    broadcast_to,
    cat,
    creation,
    expand,
    flatten,
    gather_scatter,
    getitem,
    new_tensor,
    permute,
    repeat_interleave,
    size,
    split,
    squeeze,
    transpose,
    unsqueeze,
    view,
)
from autosp.passes._token_routing import sort, topk


# ------------------------------------------------------------------------------ pointwise
def _stays_partial(node: fx.Node, lays: dict) -> bool:
    """Whether the op is linear in its partial-sum inputs, so its result is a partial sum too."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    partials = [n for n, lay in lays.items() if lay.kind == PARTIAL]
    others = [n for n, lay in lays.items() if lay.kind != PARTIAL]
    scalar_others = all(lays[n].kind == FULL and _gv(n).numel() == 1 for n in others)
    first = node.args[0] if node.args else None
    if name in ("add", "sub", "iadd", "isub", "__add__", "__sub__"):
        return not others
    if name in ("mul", "__mul__", "imul"):
        return len(partials) == 1 and scalar_others
    if name in ("truediv", "div", "__truediv__"):
        return partials == [first] and scalar_others
    return name in ("neg", "float", "to", "type_as", "clone", "contiguous", "detach", "double", "half",
                    "bfloat16") and partials == [first]


def pointwise(node: fx.Node, ctx: ShardContext) -> Decision:
    """Elementwise ops with broadcasting: every input aligned on the output's sequence dim.

    Partial sums pass through ops that are linear in them; anything else needs the full sum.
    """
    out = _gv(node)
    ins = tensor_inputs(node)
    lays = {n: layout_of(n) for n in ins}
    partials = [n for n, lay in lays.items() if lay.kind == PARTIAL]
    if partials and _stays_partial(node, lays):
        return Decision(out=PARTIAL_SUM)
    lays.update({n: full() for n in partials})
    decision = _elementwise(node, ctx, out, ins, lays)
    decision.need.update({n: (full(), 0) for n in partials})
    return decision


def _elementwise(node, ctx, out, ins, lays) -> Decision:
    if not isinstance(out, torch.Tensor):
        return replicated(node, ctx) or fallback(node, ctx, "non-tensor result of a sharded value")
    nd = out.dim()
    target = None
    for n in ins:
        lay = lays[n]
        if lay.kind == SEQ:
            cand = seq(lay.dim + nd - _gv(n).dim(), lay.outer, lay.inner)
            if target is not None and cand != target:
                return fallback(node, ctx, f"inputs sharded on different dims ({target} vs {cand})")
            target = cand
        elif lay.kind != FULL:
            return fallback(node, ctx, f"input layout {lay}")
    if target is None:
        found = _full_seq_dim(node, ctx, ins, lays, out)
        # floats made of whole values are cut here, where their work starts; not floats made of
        # integers alone (positions, masks cast; with float scalars: transformers' eager mask
        # where(mask, 0.0, min)): a cut there can leave the op that reads them (a rotary
        # embedding's matmul of the positions, attention's mask) to gather them back
        if found is None or not _is_float(out) or not any(_is_float(_gv(n)) and _gv(n).dim() > 0 for n in ins):
            return Decision(out=full(*found) if found else full())
        target = seq(*found)
    need = {}
    for n in ins:
        if lays[n].kind == SEQ:
            continue
        v = _gv(n)
        d_in = target.dim - (nd - v.dim())
        if d_in < 0 or v.dim() == 0 or (v.dim() == 1 and v.numel() == 0 and nd > 1):
            continue
        if ctx.hint(v.shape[d_in]) == 1 and ctx.hint(out.shape[target.dim]) != 1:
            continue  # broadcast along the sequence
        need[n] = (Layout(SEQ, d_in, target.outer, target.inner), 0)
    return Decision(out=target, need=need)


def _full_seq_dim(node, ctx, ins, lays, out) -> tuple | None:
    """Where the sequence lies in the output of an op over Full inputs: tracked, else by size."""
    nd = out.dim()
    for n in ins:
        lay = lays[n]
        if lay.dim is None:
            continue
        d_out = lay.dim + nd - _gv(n).dim()
        if 0 <= d_out < nd and ctx.hint(out.shape[d_out]) == ctx.hint(_gv(n).shape[lay.dim]):
            return (d_out, lay.outer, lay.inner)
    d = guess_seq_dim(ctx, out, node)
    return None if d is None else (d, 1, 1)


# ------------------------------------------------------------------------------ token-wise ops
def _tokenwise(node, ctx, main: fx.Node, out_dim, forbidden: set[int]) -> Decision:
    """Ops that act on each position on their own: ``main``'s sequence dim maps by ``out_dim``."""
    lay = layout_of(main)
    others = [n for n in tensor_inputs(node) if n is not main]
    if any(layout_of(n).kind != FULL for n in others):
        return fallback(node, ctx, "a second sharded operand")
    if lay.kind == FULL:
        d = lay.dim
        if d is None or not _is_float(_gv(node)) or d in forbidden:
            return Decision(out=full(out_dim(d) if d is not None and d not in forbidden else None))
        lay = seq(d, lay.outer, lay.inner)
        need = {main: (lay, 0)}
    elif lay.kind == SEQ:
        need = {}
    else:
        return fallback(node, ctx, f"input layout {lay}")
    if lay.dim in forbidden:
        return fallback(node, ctx, f"the op mixes positions along the sequence dim {lay.dim}")
    return Decision(out=lay.moved(out_dim(lay.dim)), need=need)


def embedding(node, ctx):
    idx = node.args[0]
    return _tokenwise(node, ctx, idx, lambda d: d, set())


def linear(node, ctx):
    x = node.args[0]
    nd = _gv(x).dim()
    return _tokenwise(node, ctx, x, lambda d: d, {nd - 1})


def matmul(node, ctx):
    a, b = node.args[0], node.args[1]
    if not isinstance(b, fx.Node) or layout_of(b).kind != FULL:
        return fallback(node, ctx, "matmul of two sharded operands (eager attention scores?)")
    na, nout = _gv(a).dim(), _gv(node).dim()
    lay_a = layout_of(a) if isinstance(a, fx.Node) else full()
    lay_b, nb = layout_of(b), _gv(b).dim()
    if lay_a.kind == FULL and lay_a.dim is None and lay_b.dim is not None and nb >= 2 and lay_b.dim != nb - 2:
        # whole values, the sequence on b's columns or batch (a rotary embedding's
        # inv_freq [B, H/2, 1] @ positions [B, 1, S], transformers <= 5.17): the output carries it
        # there, whole, and is cut where float work on it starts (cos, sin)
        return Decision(out=full(lay_b.dim + nout - nb, lay_b.outer, lay_b.inner))
    return _tokenwise(node, ctx, a, lambda d: d + nout - na, {na - 1})


def addmm(node, ctx):
    bias, x = node.args[0], node.args[1]
    if isinstance(bias, fx.Node) and layout_of(bias).kind != FULL:
        return fallback(node, ctx, "sharded bias")
    return _tokenwise(node, ctx, x, lambda d: d, {1})


def normalization(node, ctx):
    x = node.args[0]
    shape = _arg(node, 1, "normalized_shape")
    nd = _gv(x).dim()
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    return _tokenwise(node, ctx, x, lambda d: d, set(range(nd - k, nd)))


def softmax(node, ctx):
    x = node.args[0]
    nd = _gv(x).dim()
    dim = _arg(node, 1, "dim")
    if dim is None:
        return fallback(node, ctx, "softmax without dim")
    return _tokenwise(node, ctx, x, lambda d: d, {_norm_dim(dim, nd)})


REDUCTIONS = {"sum", "mean", "amax", "amin", "prod", "any", "all", "std", "var", "norm", "logsumexp", "count_nonzero"}


def reduction(node, ctx):
    x = node.args[0]
    gv = _gv(x)
    nd = gv.dim()
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dim = _arg(node, 1, "dim")
    if name == "norm":
        dim = _arg(node, 2, "dim")
    keepdim = bool(_arg(node, 3 if name == "norm" else 2, "keepdim", False))
    if isinstance(dim, torch.dtype):
        dim = None
    dims = set(range(nd)) if dim is None or dim == [] else {_norm_dim(d, nd) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    lay = layout_of(x)

    def out_dim(d):
        return d if keepdim else d - sum(1 for r in dims if r < d)

    if lay.kind == SEQ and lay.dim in dims:
        if name == "sum" and len(tensor_inputs(node)) == 1:
            return Decision(out=PARTIAL_SUM, trim=(x,))
        return fallback(node, ctx, f"{name} over the sequence dim")
    return _tokenwise(node, ctx, x, out_dim, dims)


def min_max(node, ctx):
    """``torch.min``/``torch.max`` (or the methods): of two tensors elementwise (xIELU's
    ``torch.min(x, eps)``), a pointwise op; of one tensor, a reduction with indices, not ruled."""
    other = _arg(node, 1, "other")
    if isinstance(other, fx.Node) and isinstance(_gv(other), torch.Tensor):
        return pointwise(node, ctx)
    return replicated(node, ctx) or fallback(node, ctx, "min/max over a dim (values and indices): no layout rule")


def cross_entropy(node, ctx):
    """Per-token loss on Seq logits; 'sum' gives a partial sum, 'mean' is made global by global_loss."""
    logits, target = node.args[0], _arg(node, 1, "target")
    reduction_ = node.kwargs.get("reduction", node.args[6] if len(node.args) > 6 else "mean")
    ignore_index = node.kwargs.get("ignore_index", node.args[4] if len(node.args) > 4 else -100)
    weight = _arg(node, 2, "weight")
    lay = layout_of(logits)
    if isinstance(weight, fx.Node) and layout_of(weight).kind != FULL:
        return fallback(node, ctx, "sharded class weights")
    if lay.kind == FULL:
        return replicated(node, ctx) or fallback(node, ctx, "cross_entropy over a sharded target only")
    if lay.kind != SEQ or lay.dim == 1:
        return fallback(node, ctx, f"logits layout {lay}")
    t_dim = lay.dim if lay.dim == 0 else lay.dim - 1
    t_lay = Layout(SEQ, t_dim, lay.outer, lay.inner)
    need = {}
    if layout_of(target).kind != SEQ:
        need[target] = (t_lay, ignore_index)
    elif layout_of(target) != t_lay:
        return fallback(node, ctx, "target sharded unlike the logits")
    if reduction_ == "none":
        return Decision(out=t_lay, need=need)
    if reduction_ == "sum":
        return Decision(out=PARTIAL_SUM, need=need, trim=(logits, target))
    return fallback(node, ctx, "cross_entropy 'mean' over a sharded sequence (run the global_loss pass)")


def pad(node, ctx):
    x = node.args[0]
    lay = layout_of(x)
    widths = _arg(node, 1, "pad")
    nd = _gv(x).dim()
    padded = {nd - 1 - i // 2 for i, w in enumerate(widths) if not (isinstance(w, int) and w == 0)}
    if lay.kind == FULL:
        return Decision(out=full(None) if lay.dim in padded else lay)
    if lay.kind == SEQ and lay.dim not in padded:
        return pointwise(node, ctx)
    return fallback(node, ctx, "pad along the sequence dim")


# ------------------------------------------------------------------------------ the table
_POINTWISE_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.neg,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_, operator.or_,
    operator.xor, operator.invert, operator.mod, operator.iadd, operator.imul, operator.isub, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.neg, torch.rsqrt, torch.sqrt, torch.exp,
    torch.log, torch.tanh, torch.sigmoid, torch.sin, torch.cos, torch.abs, torch.where, torch.clamp,
    torch.maximum, torch.minimum, torch.masked_fill, torch.erf, torch.log1p, torch.reciprocal, torch.square,
    torch.lerp, torch.ones_like, torch.zeros_like, torch.full_like, torch.empty_like, torch.eq, torch.ne,
    torch.lt, torch.le, torch.gt, torch.ge, torch.logical_and, torch.logical_or, torch.logical_not,
    torch.bitwise_and, torch.bitwise_or, torch.bitwise_not, torch.clone, torch.relu, torch.tril, torch.triu,
    F.silu, F.gelu, F.relu, F.tanh, F.sigmoid, F.softplus, F.mish, F.leaky_relu, F.elu, F.hardtanh,
    torch._C._nn.gelu, torch._C._nn.silu, torch.nn.functional.dropout, F.threshold,
    torch.expm1, torch.exp2, torch.log2, torch.log10, torch.sign, torch.floor, torch.ceil, torch.trunc,
    torch.sinh, torch.cosh, torch.atan, torch.asin, torch.acos, torch.isnan, torch.isinf, torch.isfinite,
    torch.nan_to_num,
]
_POINTWISE_METHODS = [
    "add", "sub", "mul", "div", "pow", "neg", "rsqrt", "sqrt", "exp", "log", "tanh", "sigmoid", "sin", "cos",
    "abs", "float", "half", "bfloat16", "double", "to", "type", "type_as", "contiguous", "clone", "masked_fill",
    "clamp", "clamp_min", "clamp_max", "detach", "eq", "ne", "lt", "le", "gt", "ge", "__and__", "__or__",
    "__invert__", "long", "int", "bool", "relu", "silu", "erf", "reciprocal", "square", "add_", "mul_",
    "masked_fill_", "where", "maximum", "minimum", "logical_and", "logical_or", "logical_not", "sub_", "div_",
    "requires_grad_", "truediv", "__add__", "__mul__", "__sub__", "__truediv__",
    "expm1", "log1p", "exp2", "log2", "log10", "sign", "floor", "ceil", "trunc", "isnan", "isinf", "isfinite",
    "nan_to_num",
]

RULES: dict[Any, Any] = {f: pointwise for f in _POINTWISE_FUNCS}
RULES.update({m: pointwise for m in _POINTWISE_METHODS})
RULES.update({
    F.embedding: embedding,
    F.linear: linear, torch._C._nn.linear: linear,
    torch.matmul: matmul, operator.matmul: matmul, "matmul": matmul, torch.mm: matmul, "mm": matmul,
    torch.addmm: addmm,
    F.layer_norm: normalization, F.rms_norm: normalization, torch.layer_norm: normalization,
    F.softmax: softmax, F.log_softmax: softmax, torch.softmax: softmax, torch.log_softmax: softmax,
    "softmax": softmax, "log_softmax": softmax,
    F.cross_entropy: cross_entropy,
    "view": view, "reshape": view, torch.reshape: view,
    "transpose": transpose, torch.transpose: transpose, "swapaxes": transpose,
    "permute": permute, torch.permute: permute,
    "unsqueeze": unsqueeze, torch.unsqueeze: unsqueeze,
    "squeeze": squeeze, torch.squeeze: squeeze,
    "flatten": flatten, torch.flatten: flatten,
    "expand": expand, torch.broadcast_to: broadcast_to, "broadcast_to": broadcast_to,
    "repeat_interleave": repeat_interleave, torch.repeat_interleave: repeat_interleave,
    operator.getitem: getitem,
    "split": split, torch.split: split, "chunk": split, torch.chunk: split, "unbind": split, torch.unbind: split,
    "tensor_split": split, "split_with_sizes": split,
    torch.cat: cat, torch.concat: cat, torch.stack: cat,
    F.pad: pad, torch._C._nn.pad: pad,
    "size": size, torch.ops.aten.sym_size.int: size,
    torch.arange: creation, torch.zeros: creation, torch.ones: creation, torch.full: creation,
    torch.empty: creation, torch.tensor: creation, torch.randn: creation, torch.rand: creation,
    "new_ones": new_tensor, "new_zeros": new_tensor, "new_full": new_tensor, "new_empty": new_tensor,
    "new_tensor": new_tensor,
})
RULES.update({torch.gather: gather_scatter, "gather": gather_scatter, torch.scatter: gather_scatter,
              "scatter": gather_scatter, "scatter_": gather_scatter, torch.scatter_add: gather_scatter,
              "scatter_add": gather_scatter, "scatter_add_": gather_scatter})
RULES.update({torch.topk: topk, "topk": topk, torch.sort: sort, "sort": sort})
RULES.update({torch.min: min_max, torch.max: min_max, "min": min_max, "max": min_max})
for _name in REDUCTIONS:
    RULES[_name] = reduction
    if hasattr(torch, _name):
        RULES[getattr(torch, _name)] = reduction
