"""Layout rules: for each op, the layout of its output and the layouts it needs of its inputs.

A rule is ``rule(node, ctx) -> Decision``. It reads the *global* shapes of the values
(``global_val``: what one device would see) and the layouts the sweep has given the inputs. It
may return rewritten arguments (a view's target shape holds the local length, not S). An op with
no rule, or a case a rule cannot prove, gets ``fallback``: every input made ``Full`` (gathered),
the op run on whole values, a line in the plan. Never a guess.

Legend: S global sequence, L local sequence, P ranks.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from autosp.graph_utils import global_val, tensor_inputs
from autosp.layout import FULL, PARTIAL, PARTIAL_SUM, SEQ, Layout, full, seq
from autosp.passes._context import ShardContext, is_sharded, layout_of


@dataclass
class Decision:
    out: Any  # Layout, or a tuple of Layouts for ops that return several tensors
    need: dict = field(default_factory=dict)  # input node -> (wanted Layout, pad value)
    args: tuple | None = None
    kwargs: dict | None = None
    trim: tuple = ()  # Seq inputs whose padding is dropped before the op (reductions over S)
    fallback: str | None = None
    replace: tuple | None = None  # (target, args): the node is replaced by a new call


def _gv(n):
    return global_val(n)


def _hints(ctx: ShardContext, shape) -> list[int]:
    return [ctx.hint(s) for s in shape]


def _is_float(v) -> bool:
    return isinstance(v, torch.Tensor) and (v.dtype.is_floating_point or v.dtype.is_complex)


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def guess_seq_dim(ctx: ShardContext, value) -> int | None:
    """The one dimension of a tensor whose size is S, or None (none, or ambiguous)."""
    if not isinstance(value, torch.Tensor):
        return None
    dims = [i for i, s in enumerate(value.shape) if ctx.is_seq_size(s)]
    return dims[0] if len(dims) == 1 else None


def fallback(node: fx.Node, ctx: ShardContext, reason: str) -> Decision:
    """Make every input Full and run the op on whole values."""
    need = {}
    for n in tensor_inputs(node):
        if is_sharded(layout_of(n)):
            need[n] = (full(), 0)
    out = _gv(node)
    if isinstance(out, (tuple, list)):
        return Decision(out=tuple(full(guess_seq_dim(ctx, o)) for o in out), need=need, fallback=reason or None)
    return Decision(out=full(guess_seq_dim(ctx, out)), need=need, fallback=(reason if need else None))


def replicated(node: fx.Node, ctx: ShardContext) -> Decision | None:
    """Ops whose tensor inputs are all Full run on every rank as they are."""
    if not any(is_sharded(layout_of(n)) for n in tensor_inputs(node)):
        return fallback(node, ctx, "")
    return None


# ------------------------------------------------------------------------------ pointwise
def _partial_rule(node: fx.Node, ctx: ShardContext) -> Decision:
    """Linear ops keep a partial sum partial; anything else needs the full sum."""
    ins = tensor_inputs(node)
    lays = {n: layout_of(n) for n in ins}
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    partials = [n for n in ins if lays[n].kind == PARTIAL]
    others = [n for n in ins if lays[n].kind != PARTIAL]
    scalar_others = all(lays[n].kind == FULL and _gv(n).numel() == 1 for n in others)
    first = node.args[0] if node.args else None
    if name in ("add", "sub", "iadd", "isub", "__add__", "__sub__") and not others:
        return Decision(out=PARTIAL_SUM)
    if name in ("mul", "__mul__", "imul") and len(partials) == 1 and scalar_others:
        return Decision(out=PARTIAL_SUM)
    if name in ("truediv", "div", "__truediv__") and partials == [first] and scalar_others:
        return Decision(out=PARTIAL_SUM)
    if name in ("neg", "float", "to", "type_as", "clone", "contiguous", "detach", "double", "half", "bfloat16"):
        if partials == [first]:
            return Decision(out=PARTIAL_SUM)
    d = pointwise(node, ctx, _skip_partial=True, _as_full=set(partials))
    d.need.update({n: (full(), 0) for n in partials})
    return d


def pointwise(node: fx.Node, ctx: ShardContext, _skip_partial: bool = False, _as_full=frozenset()) -> Decision:
    """Elementwise ops with broadcasting: every input aligned on the output's sequence dim."""
    out = _gv(node)
    ins = tensor_inputs(node)
    lays = {n: (full() if n in _as_full else layout_of(n)) for n in ins}
    if not _skip_partial and any(lay.kind == PARTIAL for lay in lays.values()):
        return _partial_rule(node, ctx)
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
        if found is None or not _is_float(out):
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
    d = guess_seq_dim(ctx, out)
    return None if d is None else (d, 1, 1)


# ------------------------------------------------------------------------------ token-wise ops
def _tokenwise(node, ctx, main: fx.Node, out_dim, forbidden: set[int], pad_value=0, check=None) -> Decision:
    """Ops that act on each position on their own: ``main``'s sequence dim maps by ``out_dim``."""
    lay = layout_of(main)
    gv = _gv(main)
    others = [n for n in tensor_inputs(node) if n is not main]
    if any(layout_of(n).kind != FULL for n in others):
        return fallback(node, ctx, "a second sharded operand")
    if lay.kind == FULL:
        d = lay.dim if lay.dim is not None else guess_seq_dim(ctx, gv)
        if d is None or not _is_float(_gv(node)) or d in forbidden:
            return Decision(out=full(out_dim(d) if d is not None and d not in forbidden else None))
        lay = seq(d, lay.outer, lay.inner)
        need = {main: (lay, pad_value)}
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


# ------------------------------------------------------------------------------ shape ops
def _resolve(ctx, shape_h: list[int], numel: int) -> list[int]:
    if -1 in shape_h:
        known = math.prod(s for s in shape_h if s != -1)
        shape_h = [numel // known if s == -1 else s for s in shape_h]
    return shape_h


def _view_target(node, ctx):
    """The target shape of a view as a list of ints and SymInt nodes, and whether it was one argument."""
    if len(node.args) == 2 and isinstance(node.args[1], fx.Node) and isinstance(global_val(node.args[1]), (tuple, list)):
        return _unpack_sizes(node.args[1], node, ctx), True
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple, torch.Size)):
        return list(node.args[1]), True
    if "shape" in node.kwargs:
        return list(node.kwargs["shape"]), True
    return list(node.args[1:]), False


def _unpack_sizes(sizes: fx.Node, user: fx.Node, ctx) -> list:
    """A node holding a whole ``torch.Size``, as one node (or int) per entry."""
    from autosp.graph_utils import new_node

    out = []
    with ctx.graph.inserting_before(user):
        for i, s in enumerate(global_val(sizes)):
            if isinstance(s, int):
                out.append(s)
            else:
                item = new_node(ctx.graph, operator.getitem, (sizes, i), like=user, fake_mode=ctx.fake_mode)
                item.meta["autosp.layout"] = full()
                out.append(item)
    return out


def map_view(ctx, in_shape, lay: Layout, target_h: list[int]) -> tuple[int, int, int] | None:
    """Where the sequence lands in a view: (dim, outer, inner), or None when the view splits it."""
    ins = _hints(ctx, in_shape)
    s = ctx.hint(ctx.seq_len)
    pre = math.prod(ins[: lay.dim]) * lay.outer
    cum = 1
    for j, t in enumerate(target_h):
        if cum * t >= pre * s and t > 0:
            if pre % cum:
                return None
            a = pre // cum
            if t % (a * s):
                return None
            return (j, a, t // (a * s))
        cum *= t
    return None


def view(node, ctx):
    x = node.args[0]
    lay = layout_of(x)
    gv = _gv(x)
    target, as_tuple = _view_target(node, ctx)
    target_h = _resolve(ctx, [ctx.hint(t.meta["val"]) if isinstance(t, fx.Node) else t for t in target], ctx.hint(gv.numel()))
    if lay.kind == PARTIAL:
        return _partial_rule(node, ctx)
    if lay.kind == FULL:
        found = map_view(ctx, gv.shape, lay, target_h) if lay.dim is not None else None
        if found is None:
            d = guess_seq_dim(ctx, _gv(node))
            return Decision(out=full(d))
        return Decision(out=full(*found))
    if lay.kind != SEQ:
        return fallback(node, ctx, f"view of layout {lay}")
    found = map_view(ctx, gv.shape, lay, target_h)
    if found is None:
        return fallback(node, ctx, "the view splits the sequence dim")
    j, a, c = found
    new = list(target)
    if new[j] != -1:
        others = [i for i, t in enumerate(new) if t == -1]
        for i in others:
            if any(not isinstance(s, int) for k, s in enumerate(gv.shape) if k != lay.dim):
                return fallback(node, ctx, "view with -1 and symbolic non-sequence sizes")
            new[i] = target_h[i]
        new[j] = -1
    args = (x, tuple(new)) if as_tuple else (x, *new)
    kwargs = {k: v for k, v in node.kwargs.items() if k != "shape"}
    return Decision(out=seq(j, a, c), args=args, kwargs=kwargs)


def _permute_rule(node, ctx, perm_of):
    """Ops that only reorder or add/drop size-1 dims: ``perm_of(d)`` is d's new index (None: dropped)."""
    x = node.args[0]
    lay = layout_of(x)
    if lay.kind == PARTIAL:
        return _partial_rule(node, ctx) if _gv(node).numel() == 1 else fallback(node, ctx, "partial value reshaped")
    if lay.kind not in (SEQ, FULL):
        return fallback(node, ctx, f"layout {lay}")
    if lay.dim is None:
        return Decision(out=full(guess_seq_dim(ctx, _gv(node))))
    d = perm_of(lay.dim)
    if d is None:
        return fallback(node, ctx, "the op drops the sequence dim") if lay.kind == SEQ else Decision(out=full())
    return Decision(out=lay.moved(d))


def transpose(node, ctx):
    nd = _gv(node.args[0]).dim()
    a, b = (_norm_dim(d, nd) for d in node.args[1:3])
    return _permute_rule(node, ctx, lambda d: b if d == a else a if d == b else d)


def permute(node, ctx):
    nd = _gv(node.args[0]).dim()
    dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    dims = [_norm_dim(d, nd) for d in dims]
    return _permute_rule(node, ctx, lambda d: dims.index(d))


def unsqueeze(node, ctx):
    nd = _gv(node.args[0]).dim()
    u = _norm_dim(_arg(node, 1, "dim"), nd + 1)
    return _permute_rule(node, ctx, lambda d: d + 1 if d >= u else d)


def squeeze(node, ctx):
    gv = _gv(node.args[0])
    dim = _arg(node, 1, "dim")
    dims = [i for i, s in enumerate(gv.shape) if ctx.hint(s) == 1] if dim is None else [
        _norm_dim(d, gv.dim()) for d in (dim if isinstance(dim, (list, tuple)) else [dim]) if ctx.hint(gv.shape[_norm_dim(d, gv.dim())]) == 1
    ]
    return _permute_rule(node, ctx, lambda d: None if d in dims else d - sum(1 for s in dims if s < d))


def flatten(node, ctx):
    gv = _gv(node.args[0])
    nd = gv.dim()
    start = _norm_dim(_arg(node, 1, "start_dim", 0), nd) if nd else 0
    end = _norm_dim(_arg(node, 2, "end_dim", -1), nd) if nd else 0
    lay = layout_of(node.args[0])
    if lay.kind == SEQ and start <= lay.dim <= end:
        target = [ctx.hint(s) for s in gv.shape[:start]] + [-1] + [ctx.hint(s) for s in gv.shape[end + 1 :]]
        found = map_view(ctx, gv.shape, lay, _resolve(ctx, target, ctx.hint(gv.numel())))
        return Decision(out=seq(*found)) if found else fallback(node, ctx, "flatten splits the sequence")
    return _permute_rule(node, ctx, lambda d: d if d < start else d - (end - start) if d > end else start)


def expand(node, ctx):
    x = node.args[0]
    lay = layout_of(x)
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    sizes = list(sizes)
    shift = len(sizes) - _gv(x).dim()
    if lay.kind != SEQ:
        return _permute_rule(node, ctx, lambda d: d + shift)
    if lay.outer != 1 or lay.inner != 1:
        return fallback(node, ctx, "expand of a flattened sequence dim")
    sizes[lay.dim + shift] = -1
    return Decision(out=lay.moved(lay.dim + shift), args=(x, *sizes), kwargs={})


def getitem(node, ctx):
    x, index = node.args
    xv = _gv(x)
    if isinstance(xv, (tuple, list)):
        lays = layout_of(x)
        return Decision(out=lays[index] if isinstance(lays, tuple) else full())
    lay = layout_of(x)
    if not isinstance(index, tuple):
        index = (index,)
    if any(isinstance(i, fx.Node) or isinstance(i, torch.Tensor) for i in index) or any(isinstance(i, (list, bool)) for i in index):
        return replicated(node, ctx) or fallback(node, ctx, "advanced indexing of a sharded value")
    if lay.kind == PARTIAL:
        return fallback(node, ctx, "indexing a partial sum")
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded = []
    for i in index:
        if i is Ellipsis:
            expanded += [slice(None)] * (xv.dim() - n_real)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (xv.dim() - sum(1 for i in expanded if i is not None))
    d_in, d_out, mapping = 0, 0, {}
    for i in expanded:
        if i is None:
            d_out += 1
            continue
        if isinstance(i, slice):
            full_slice = (i.start in (None, 0)) and i.stop is None and i.step in (None, 1)
            mapping[d_in] = (d_out, full_slice)
            d_out += 1
        else:
            mapping[d_in] = (None, False)
        d_in += 1
    if lay.dim is None:
        return Decision(out=full(guess_seq_dim(ctx, _gv(node))))
    d, whole = mapping.get(lay.dim, (None, False))
    if lay.kind == FULL:
        return Decision(out=full(d, lay.outer, lay.inner) if whole else full(guess_seq_dim(ctx, _gv(node))))
    if d is None or not whole:
        return fallback(node, ctx, "indexing picks part of the sequence")
    return Decision(out=lay.moved(d))


def split(node, ctx):
    x = node.args[0]
    nd = _gv(x).dim()
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dim = _arg(node, 2 if name in ("split", "chunk", "tensor_split", "split_with_sizes") else 1, "dim", 0)
    dim = _norm_dim(dim, nd)
    lay = layout_of(x)
    n_out = len(_gv(node))
    if lay.kind == SEQ and lay.dim == dim:
        d = fallback(node, ctx, "split along the sequence dim")
        return Decision(out=tuple(full() for _ in range(n_out)), need=d.need, fallback=d.fallback)
    if name == "unbind":
        lay2 = lay.moved(lay.dim - (1 if lay.dim is not None and lay.dim > dim else 0)) if lay.dim is not None else lay
        return Decision(out=tuple(lay2 for _ in range(n_out)))
    return Decision(out=tuple(lay for _ in range(n_out)))


def cat(node, ctx):
    tensors = list(node.args[0])
    dim = _arg(node, 1, "dim", 0)
    out = _gv(node)
    stack = getattr(node.target, "__name__", "") == "stack"
    nd = out.dim()
    dim = _norm_dim(dim, nd)
    real = [t for t in tensors if not (_gv(t).dim() == 1 and _gv(t).numel() == 0 and nd > 1)]
    lays = [layout_of(t) for t in real]
    seqs = [lay for lay in lays if lay.kind == SEQ]
    if not seqs:
        return replicated(node, ctx) or fallback(node, ctx, f"cat of layouts {[str(x) for x in lays]}")
    d_in = seqs[0].dim
    d_out = d_in + (1 if stack and d_in >= dim else 0)
    if (not stack and d_in == dim) or any(lay.kind not in (SEQ, FULL) for lay in lays):
        return fallback(node, ctx, "cat along the sequence dim")
    if any(lay != seqs[0] for lay in seqs):
        return fallback(node, ctx, "cat of differently sharded values")
    need = {t: (seqs[0], 0) for t, lay in zip(real, lays) if lay.kind == FULL}
    return Decision(out=seqs[0].moved(d_out), need=need)


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


def global_size(x: torch.Tensor, dim: int, length):
    """``x.size()`` of a sequence shard as one device sees it (``dim`` holds ``length``)."""
    sizes = list(x.size())
    sizes[dim] = length
    return torch.Size(sizes)


def size(node, ctx):
    x = node.args[0]
    lay = layout_of(x)
    if lay.kind != SEQ:
        return Decision(out=full())
    dim = _arg(node, 1, "dim")
    length = ctx.s_arg() if lay.outer * lay.inner == 1 else None
    if length is None:
        return fallback(node, ctx, "size of a flattened sequence dim")
    nd = _gv(x).dim()
    if dim is None:
        return Decision(out=full(), replace=(global_size, (x, lay.dim, length)))
    if _norm_dim(dim, nd) != lay.dim:
        return Decision(out=full())
    return Decision(out=full(), replace=(operator.mul, (length, 1)))


def creation(node, ctx):
    return Decision(out=full(guess_seq_dim(ctx, _gv(node))))


def new_tensor(node, ctx):
    """``x.new_zeros(sizes)`` and friends: x gives only dtype and device."""
    return Decision(out=full(guess_seq_dim(ctx, _gv(node))))


def dropout(node, ctx):
    return pointwise(node, ctx)


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
]
_POINTWISE_METHODS = [
    "add", "sub", "mul", "div", "pow", "neg", "rsqrt", "sqrt", "exp", "log", "tanh", "sigmoid", "sin", "cos",
    "abs", "float", "half", "bfloat16", "double", "to", "type", "type_as", "contiguous", "clone", "masked_fill",
    "clamp", "clamp_min", "clamp_max", "detach", "eq", "ne", "lt", "le", "gt", "ge", "__and__", "__or__",
    "__invert__", "long", "int", "bool", "relu", "silu", "erf", "reciprocal", "square", "add_", "mul_",
    "masked_fill_", "where", "maximum", "minimum", "logical_and", "logical_or", "logical_not", "sub_", "div_",
    "requires_grad_", "truediv", "__add__", "__mul__", "__sub__", "__truediv__",
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
    "expand": expand,
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
for _name in REDUCTIONS:
    RULES[_name] = reduction
    if hasattr(torch, _name):
        RULES[getattr(torch, _name)] = reduction
