"""Layout rules of shape ops: views and reshapes (which hold the global length in their
arguments), dimension shuffles, indexing, split/cat, size queries and tensor creation.

A view's target shape is rewritten so the sequence dim holds the local length; a size query of
a sequence shard answers the global length, as one device would.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from autosp.graph_utils import global_val, tensor_inputs
from autosp.layout import FULL, PARTIAL, PARTIAL_SUM, SEQ, Layout, full, seq
from autosp.passes._context import layout_of
from autosp.passes._rule_base import (
    Decision,
    _arg,
    _gv,
    _hints,
    _norm_dim,
    fallback,
    guess_seq_dim,
    replicated,
)


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
        return _reshaped_partial(node, ctx)
    if lay.kind == FULL:
        found = map_view(ctx, gv.shape, lay, target_h) if lay.dim is not None else None
        if found is None:
            d = guess_seq_dim(ctx, _gv(node), node)
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


def _reshaped_partial(node, ctx) -> Decision:
    """A reshaped scalar partial sum stays a partial sum; anything larger is summed first."""
    if _gv(node).numel() == 1:
        return Decision(out=PARTIAL_SUM)
    return Decision(out=full(), need={node.args[0]: (full(), 0)})


def _permute_rule(node, ctx, perm_of):
    """Ops that only reorder or add/drop size-1 dims: ``perm_of(d)`` is d's new index (None: dropped)."""
    x = node.args[0]
    lay = layout_of(x)
    if lay.kind == PARTIAL:
        return _reshaped_partial(node, ctx)
    if lay.kind not in (SEQ, FULL):
        return fallback(node, ctx, f"layout {lay}")
    if lay.dim is None:
        return Decision(out=full(guess_seq_dim(ctx, _gv(node), node)))
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
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    return _expand_rule(node, ctx, list(sizes), lambda x, sizes: (x, *sizes))


def broadcast_to(node, ctx):
    """``torch.broadcast_to(x, shape)``: ``expand`` with the shape in one argument."""
    shape = _arg(node, 1, "size")
    sizes = _unpack_sizes(shape, node, ctx) if isinstance(shape, fx.Node) else list(shape)
    return _expand_rule(node, ctx, sizes, lambda x, sizes: (x, tuple(sizes)))


def _expand_rule(node, ctx, sizes: list, args_of):
    """``expand``/``broadcast_to`` of ``node.args[0]`` to ``sizes``: a sequence shard expands with
    its own length (-1 there); ``args_of(x, sizes)`` gives the op's arguments."""
    x = node.args[0]
    lay = layout_of(x)
    shift = len(sizes) - _gv(x).dim()
    if lay.kind != SEQ:
        return _permute_rule(node, ctx, lambda d: d + shift)
    if lay.outer != 1 or lay.inner != 1:
        name = node.target if isinstance(node.target, str) else node.target.__name__
        return fallback(node, ctx, f"{name} of a flattened sequence dim")
    sizes[lay.dim + shift] = -1
    return Decision(out=lay.moved(lay.dim + shift), args=args_of(x, sizes), kwargs={})


def repeat_interleave(node, ctx):
    """Each element repeated a whole number of times along one dim (KV heads to the query heads):
    the layout is kept where that dim is not the sequence's. Along the sequence, with a tensor
    of repeats, or flattened (no dim), a shard's result is not a shard of the result."""
    x = node.args[0]
    lay = layout_of(x)
    repeats, dim = _arg(node, 1, "repeats"), _arg(node, 2, "dim")
    if lay.kind != SEQ:
        if dim is None and lay.kind != FULL:
            return fallback(node, ctx, f"repeat_interleave flattens a tensor of layout {lay}")
        if dim is None or (lay.kind == FULL and _norm_dim(dim, _gv(x).dim()) == lay.dim):
            return Decision(out=full(guess_seq_dim(ctx, _gv(node), node)))  # that dim no longer the sequence
        return _permute_rule(node, ctx, lambda d: d)
    if dim is None or isinstance(repeats, fx.Node) or _norm_dim(dim, _gv(x).dim()) == lay.dim:
        return fallback(node, ctx, "repeat_interleave along the sequence, flattened or by a tensor of repeats")
    return Decision(out=lay)


def getitem(node, ctx):
    x, index = node.args
    xv = _gv(x)
    if isinstance(xv, (tuple, list)):
        lays = layout_of(x)
        return Decision(out=lays[index] if isinstance(lays, tuple) else full())
    lay = layout_of(x)
    if not isinstance(index, tuple):
        index = (index,)
    picks = _one_list_of_ints(index)  # x[:, :, [-2]] (Falcon's fused q/k/v): a dim kept, its entries picked
    if picks is None and (any(isinstance(i, (fx.Node, torch.Tensor, list, bool)) for i in index)):
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
        if isinstance(i, slice) or i is picks:
            full_slice = isinstance(i, slice) and i.start in (None, 0) and i.stop is None and i.step in (None, 1)
            mapping[d_in] = (d_out, full_slice)
            d_out += 1
        else:
            mapping[d_in] = (None, False)
        d_in += 1
    if lay.dim is None:
        return Decision(out=full(guess_seq_dim(ctx, _gv(node), node)))
    d, whole = mapping.get(lay.dim, (None, False))
    if lay.kind == FULL:
        return Decision(out=full(d, lay.outer, lay.inner) if whole else full(guess_seq_dim(ctx, _gv(node), node)))
    if d is None or not whole:
        return fallback(node, ctx, "indexing picks part of the sequence")
    return Decision(out=lay.moved(d))


def gather_scatter(node, ctx):
    """``x.gather(dim, index)``, ``x.scatter(dim, index, src or value)`` (and ``scatter_``,
    ``scatter_add``, ``torch.gather``): along a dim that is not the sequence's, each sequence
    position reads and writes its own slice alone, so a shard's result is the result's shard,
    when x, index and a tensor src hold the sequence on the same dim, cut the same way (the
    router's top-k weights picked from its scores: ``scores.gather(1, topk_indices)``)."""
    x = node.args[0]
    dim = _arg(node, 1, "dim")
    tensors = tensor_inputs(node)
    whole = replicated(node, ctx)
    if whole is not None:
        return whole
    lay = layout_of(x)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if not isinstance(dim, int) or lay.kind != SEQ or any(layout_of(n) != lay for n in tensors):
        return fallback(node, ctx, f"{name} of values not sharded alike along the sequence")
    if _norm_dim(dim, _gv(x).dim()) == lay.dim:
        return fallback(node, ctx, f"{name} along the sequence")
    if any(_gv(n).shape[lay.dim] != _gv(x).shape[lay.dim] for n in tensors):
        return fallback(node, ctx, f"{name} with an index shorter than the sequence")
    return Decision(out=lay)


def _one_list_of_ints(index: tuple) -> list | None:
    """The index's list when it is its one advanced index, a non-empty list of ints beside slices,
    None and Ellipsis only: the result keeps that dim in place (``len(list)`` long), as a slice
    would. Anything else (tensors, bools, two lists, a list beside an int) is None."""
    lists = [i for i in index if isinstance(i, list)]
    if len(lists) != 1 or not lists[0] or not all(isinstance(v, int) and not isinstance(v, bool) for v in lists[0]):
        return None
    if not all(i is lists[0] or i is None or i is Ellipsis or isinstance(i, slice) for i in index):
        return None
    return lists[0]


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
    if not stack:  # cat([empty, x]) along any dim is x (a KV cache's first update): no gather
        real = [t for t in real if not (_gv(t).dim() == nd and _static_zero(_gv(t).shape[dim]))]
    lays = [layout_of(t) for t in real]
    seqs = [lay for lay in lays if lay.kind == SEQ]
    if not seqs:
        return replicated(node, ctx) or fallback(node, ctx, f"cat of layouts {[str(x) for x in lays]}")
    d_in = seqs[0].dim
    d_out = d_in + (1 if stack and d_in >= dim else 0)
    if not stack and d_in == dim and len(real) == 1:
        return Decision(out=seqs[0])
    if (not stack and d_in == dim) or any(lay.kind not in (SEQ, FULL) for lay in lays):
        return fallback(node, ctx, "cat along the sequence dim")
    if any(lay != seqs[0] for lay in seqs):
        return fallback(node, ctx, "cat of differently sharded values")
    need = {t: (seqs[0], 0) for t, lay in zip(real, lays, strict=True) if lay.kind == FULL}
    return Decision(out=seqs[0].moved(d_out), need=need)


def _static_zero(size) -> bool:
    return isinstance(size, int) and size == 0


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
