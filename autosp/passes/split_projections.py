"""split_projections: q, k and v made one head chunk at a time, the other ranks' chunks first, so
that their all-to-all crosses while this rank's own chunk is made (``Config.split_projections``).

After shard_sequence every self-attention starts with one all-to-all of q, k and v. In the
forward nothing is independent of it: its input is the projections' output and attention needs
its output, so it runs with the device idle (16K on 2x H200: ~0.13 ms a layer, 3.4 ms a step).
But the all-to-all sends head chunk d to rank d, and head chunk d is made by rows d of the
projection's weight alone. So the chunks for the other ranks can be made first, sent, and this
rank's own chunk (which never leaves it) made while they cross::

    q_BNLH = rope(view(linear(x, Wq)))  (and k, v)      q_d = rope(view(linear(x, Wq[d])))  for d != r
    y = all_to_all(pack(q, k, v))                ->     sent = exchange_start(rows(q_d, k_d, v_d))
    q_BKSH, k_BkSH, v_BkSH = unpack(y)                  q_r = rope(view(linear(x, Wq[r])))  (and k_r, v_r)
                                                        y = exchange_finish(sent, row(q_r, k_r, v_r))
                                                        q_BKSH, k_BkSH, v_BkSH = unpack(y)

Measured (2x H200, 16K, benchmarks/RESULTS.md 2026-11-30), and why it is off by default: one
layer's window alone took 0.584 ms as one GEMM and one all-to-all, 0.483 ms split so (0.461
with the peers' rows pushed by the copy engines). In the training step it did not pay: 0.197 s
against 0.194, the all-to-alls' time with no compute beside them 8.04 ms against 7.71. The
profile says why: NCCL's kernel starts when SMs are free, and the own chunk's GEMM, queued
right behind the issue, takes them all first (the median delay from issue to kernel start went
from 6 to 34 us), so the rows crossed after the GEMM, as before. The graph half is kept: the
transport that would make it pay is a copy-engine exchange (a push into the peer's symmetric
buffer needs no SMs; beside the same GEMM it overlapped in the window probe), which would replace
``exchange_start``/``exchange_finish`` alone.

What is split: the ops between one ``linear`` (a parameter's weight) and the all-to-all's
input, when each keeps the heads apart: views and reshapes that keep a head chunk one block of
elements, transposes, permutes, unsqueezes, casts, elementwise ops whose other operands do not
vary over the heads (RoPE's cos and sin, a norm's weight), reductions and concatenations along
other dims, slices along other dims (RoPE's halves). Each op is cloned per chunk (a view's head
count divided by P), the weight (and bias) narrowed to the chunk's rows. The clone's value must
be the original's with the head dim divided by P, or the site is left as it was. The sum of the
chunks is the same arithmetic on every element (a GEMM per column block), so the result is the
unsplit one up to the GEMM kernel's own choices. A site with any other op between the linear
and the all-to-all, a value read elsewhere, or anything symbolic in its shapes is left as it
was, with a line in the plan saying why.

Inductor must keep the order: the all-to-all is issued by torch's functional op without its
wait (``_torch_private.all_to_all_unwaited``; the public functional collectives wait at once
while traced), and the forward compiles under ``_torch_private.collective_fusion_barriers``:
without them Inductor fused the own chunk's RoPE with the peers' (both read cos and sin) and
ran the own projections before the issue.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from autosp import collectives
from autosp._torch_private import fake_mode_of, is_symbolic
from autosp.graph_utils import eliminate_dead_code, new_node, val
from autosp.passes._context import LAYOUT
from autosp.passes._rule_base import _norm_dim

_LINEAR = (torch._C._nn.linear, F.linear)
_SAME_DIM_METHODS = {"to", "float", "bfloat16", "half", "type_as", "contiguous", "clone"}
_POINTWISE_METHODS = {"mul", "add", "sub", "div", "pow", "neg", "rsqrt", "exp", "sigmoid", "tanh"}
_POINTWISE_FUNCTIONS = {operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, torch.mul,
                        torch.add, torch.sub, torch.div, torch.neg, torch.rsqrt, torch.pow, torch.exp,
                        torch.sigmoid, torch.tanh}
_REDUCTIONS = {"mean", "sum", "amax"}
_SEARCH = 256  # nodes looked at behind one all-to-all input before giving up


class _Refused(Exception):
    pass


def split_projections_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Rewrite each q/k/v all-to-all whose inputs are split-able into peers-first chunks."""
    if not cfg.options.split_projections or cfg.world <= 1 or cfg.group_name is None:
        return gm
    plan = gm.meta["autosp.plan"]
    fake_mode = fake_mode_of([val(n) for n in gm.graph.nodes if n.op == "placeholder"])
    done = 0
    for node in [n for n in gm.graph.nodes if n.target is collectives.seq_to_head_many]:
        xs, group_name, world, seq_dim, head_dim = node.args
        try:
            chains = [_chain(x, head_dim, world, node) for x in xs]
        except _Refused as why:
            plan.note(f"split_projections: {node.name} left as one all-to-all: {why}")
            continue
        _rewrite(gm.graph, node, chains, group_name, world, cfg.rank, seq_dim, head_dim, fake_mode, plan)
        done += 1
    if done:
        eliminate_dead_code(gm.graph)
        gm.recompile()
        plan.note(f"split_projections: {done} q/k/v all-to-all(s) made peers' head chunks first, "
                  "this rank's own chunk made while they cross")
    return gm


class _Chain:
    """The ops from one linear to an all-to-all input: in graph order, each with the dim holding
    the heads in its value and, for views, the shape argument to give its per-chunk clone."""

    def __init__(self, root: fx.Node, nodes: list[fx.Node], heads: dict[fx.Node, int],
                 shapes: dict[fx.Node, tuple]):
        self.root, self.nodes, self.heads, self.shapes = root, nodes, heads, shapes


def _chain(x: fx.Node, head_dim: int, world: int, site: fx.Node) -> _Chain:
    if not isinstance(x, fx.Node) or any(u is not site for u in x.users):
        raise _Refused(f"{getattr(x, 'name', x)} is read elsewhere too")
    seen, stack, roots = set(), [x], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > _SEARCH:
            raise _Refused(f"no projection within {_SEARCH} ops of {x.name}")
        if n.op == "call_function" and n.target in _LINEAR:
            roots.append(n)
            continue
        stack.extend(i for i in n.all_input_nodes if i.op not in ("placeholder", "get_attr"))
    if len(roots) != 1:
        raise _Refused(f"{x.name} comes from {len(roots)} linear projections, not one")
    root = roots[0]
    weight = root.args[1] if len(root.args) > 1 else root.kwargs.get("weight")
    if not isinstance(weight, fx.Node) or weight.op not in ("placeholder", "get_attr"):
        raise _Refused(f"{root.name}'s weight is not a parameter")
    inside = {root}
    for n in root.graph.nodes:  # graph order: a node is inside if one of its inputs is
        if n in seen and n is not root and any(i in inside for i in n.all_input_nodes):
            inside.add(n)
    if x not in inside:
        raise _Refused(f"{x.name} is not made from {root.name}")
    nodes = [n for n in root.graph.nodes if n in inside]
    for n in nodes:
        if n is not x and any(u not in inside for u in n.users):
            raise _Refused(f"{n.name} (between {root.name} and {x.name}) is read elsewhere too")
        if not isinstance(val(n), torch.Tensor):
            raise _Refused(f"{n.name} (between {root.name} and {x.name}) is not one tensor")
        if any(is_symbolic(s) for s in val(n).shape):
            raise _Refused(f"{n.name} has a symbolic shape")
    out_features = val(root).shape[-1]
    if out_features % world:
        raise _Refused(f"{root.name}'s {out_features} outputs do not split over {world} ranks")
    heads, shapes = {root: val(root).dim() - 1}, {}
    for n in nodes[1:]:
        try:
            heads[n] = _head_dim_of(n, heads, world, shapes)
        except (IndexError, KeyError, TypeError, ValueError) as e:  # arguments spelled as no rule expects
            raise _Refused(f"{n.name}'s arguments are not read by the rule for it ({e!r})") from e
    if heads[x] != head_dim:
        raise _Refused(f"the heads of {x.name} end in dim {heads[x]}, the all-to-all splits dim {head_dim}")
    return _Chain(root, nodes, heads, shapes)


def _head_dim_of(n: fx.Node, heads: dict[fx.Node, int], world: int, shapes: dict[fx.Node, tuple]) -> int:
    """The dim holding the heads in ``n``'s value, given its chain inputs'; _Refused where ``n``
    would mix heads or its clone could not be made by dividing one size by ``world``."""
    ins = [i for i in n.all_input_nodes if i in heads]
    dims = {heads[i] + val(n).dim() - val(i).dim() for i in ins}  # right-aligned, as broadcasting aligns
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    first = ins[0]
    hi = heads[first]
    if n.op == "call_method" and n.target in ("view", "reshape") or n.target is torch.reshape:
        return _view_head(n, first, hi, world, shapes)
    if n.op == "call_method" and n.target == "transpose" or n.target is torch.transpose:
        a, b = (_norm_dim(d, val(first).dim()) for d in n.args[1:3])
        return b if hi == a else a if hi == b else hi
    if n.op == "call_method" and n.target == "permute":
        perm = n.args[1:]
        perm = list(perm[0]) if len(perm) == 1 and isinstance(perm[0], (list, tuple)) else list(perm)
        return [_norm_dim(p, len(perm)) for p in perm].index(hi)
    if n.op == "call_method" and n.target == "unsqueeze" or n.target is torch.unsqueeze:
        d = _norm_dim(n.args[1], val(n).dim())
        return hi + 1 if d <= hi else hi
    if n.op == "call_method" and n.target in _SAME_DIM_METHODS:
        return hi
    if n.op == "call_method" and n.target in _REDUCTIONS or n.target in (torch.mean, torch.sum, torch.amax):
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        keep = n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False)
        if dim is None:
            raise _Refused(f"{n.name} reduces over every dim, the heads too")
        dim_list = [_norm_dim(d, val(first).dim()) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
        if hi in dim_list:
            raise _Refused(f"{n.name} reduces over the heads")
        return hi if keep else hi - sum(d < hi for d in dim_list)
    if n.target is operator.getitem:
        index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        if not all(isinstance(i, slice) or i is Ellipsis for i in index) or sum(i is Ellipsis for i in index) > 1:
            raise _Refused(f"{n.name} indexes with {index!r}")
        nd = val(first).dim()
        if Ellipsis in index:
            e = index.index(Ellipsis)
            index = index[:e] + (slice(None),) * (nd - len(index) + 1) + index[e + 1:]
        if hi < len(index) and index[hi] != slice(None):
            raise _Refused(f"{n.name} slices the heads")
        return hi
    if n.target is torch.cat:
        tensors, dim = n.args[0], (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0))
        if not all(isinstance(t, fx.Node) and t in heads for t in tensors) or len(dims) != 1:
            raise _Refused(f"{n.name} concatenates values from outside the chain")
        if _norm_dim(dim, val(n).dim()) == hi:
            raise _Refused(f"{n.name} concatenates along the heads")
        return hi
    if n.op == "call_method" and n.target in _POINTWISE_METHODS or n.target in _POINTWISE_FUNCTIONS:
        if len(dims) != 1:
            raise _Refused(f"{n.name} combines values whose heads lie in different dims")
        ho = dims.pop()
        for other in n.all_input_nodes:
            if other in heads:
                continue
            v = val(other)
            at = ho - (val(n).dim() - v.dim()) if isinstance(v, torch.Tensor) else -1
            if isinstance(v, torch.Tensor) and 0 <= at < v.dim() and v.shape[at] != 1:
                raise _Refused(f"{n.name} reads {other.name}, which varies over the heads")
        return ho
    raise _Refused(f"{n.name} ({name}) is not one the split knows keeps the heads apart")


def _view_head(n: fx.Node, src: fx.Node, hi: int, world: int, shapes: dict[fx.Node, tuple]) -> int:
    """A view keeps head chunks whole where the heads' dim and everything inside it cover the same
    elements before and after (row-major order); its clone's shape: that dim's size over P."""
    before, after = list(val(src).shape), list(val(n).shape)
    outer, block = math.prod(before[:hi]), math.prod(before[hi:])
    for ho in range(len(after)):
        o, b = math.prod(after[:ho]), math.prod(after[ho:])
        if o == outer and b == block and after[ho] % world == 0 and after[ho] > 1:
            args = n.args
            sizes = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
            if len(sizes) != len(after) or not all(isinstance(s, int) for s in sizes):
                raise _Refused(f"{n.name}'s shape {sizes} is not plain ints")
            if sizes[ho] != -1:
                sizes[ho] = after[ho] // world
            shapes[n] = tuple(sizes)
            return ho
    raise _Refused(f"{n.name} reshapes {before} -> {after} across the heads")


def _rewrite(graph: fx.Graph, site: fx.Node, chains: list[_Chain], group_name: str, world: int, rank: int,
             seq_dim: int, head_dim: int, fake_mode, plan) -> None:
    shapes = [list(val(c.nodes[-1]).shape) for c in chains]

    def flat_chunks(d: int) -> list[fx.Node]:
        return [new_node(graph, torch.reshape, (_clone(graph, c, d, world, fake_mode), (-1,)), like=site,
                         fake_mode=fake_mode) for c in chains]

    def cat(pieces: list[fx.Node]) -> fx.Node:  # one copy into the buffer the collective reads
        return new_node(graph, torch.cat, (pieces,), like=site, fake_mode=fake_mode)

    with graph.inserting_before(site):
        peers = cat([f for d in range(world) if d != rank for f in flat_chunks(d)])
        rows = new_node(graph, torch.reshape, (peers, (world - 1, -1)), like=site, fake_mode=fake_mode)
        sent = new_node(graph, collectives.exchange_start, (rows, group_name, world, rank), like=site,
                        fake_mode=fake_mode)
        own = cat(flat_chunks(rank))
        y = new_node(graph, collectives.exchange_finish, (sent, own, world, rank), like=site, fake_mode=fake_mode)
        outs = new_node(graph, collectives.unpack_head_rows, (y, shapes, world, seq_dim, head_dim), like=site,
                        fake_mode=fake_mode)
    site.replace_all_uses_with(outs)
    for c in plan.collectives:
        if c.node == site.name:
            c.node = sent.name
            c.detail += "; the peers' head chunks made first and sent while this rank's is made"
    graph.erase_node(site)


def _clone(graph: fx.Graph, chain: _Chain, d: int, world: int, fake_mode) -> fx.Node:
    """Chain ``chain`` for head chunk ``d`` alone: the weight's rows of the chunk, each op again."""
    root = chain.root
    rows = val(root).shape[-1] // world
    env: dict[fx.Node, fx.Node] = {}
    args = list(root.args)
    weight = args[1] if len(args) > 1 else root.kwargs["weight"]
    bias = args[2] if len(args) > 2 else root.kwargs.get("bias")
    w = new_node(graph, torch.narrow, (weight, 0, d * rows, rows), like=root, fake_mode=fake_mode)
    b = None if bias is None else new_node(graph, torch.narrow, (bias, 0, d * rows, rows), like=root,
                                           fake_mode=fake_mode)
    env[root] = new_node(graph, root.target, (args[0], w, b), like=root, fake_mode=fake_mode)
    for n in chain.nodes[1:]:
        if n in chain.shapes:  # x.view(*sizes) / x.reshape(*sizes), torch.reshape(x, sizes)
            sizes = chain.shapes[n]
            new_args = (env[n.args[0]], *sizes) if n.op == "call_method" else (env[n.args[0]], sizes)
        else:
            new_args = fx.node.map_arg(n.args, lambda a: env.get(a, a))
        new_kwargs = fx.node.map_arg(n.kwargs, lambda a: env.get(a, a))
        clone = new_node(graph, n.target, new_args, new_kwargs, like=n, fake_mode=fake_mode, op=n.op)
        want = list(val(n).shape)
        want[chain.heads[n]] //= world
        if list(val(clone).shape) != want:
            raise AssertionError(f"split_projections: {n.name}'s chunk is {list(val(clone).shape)}, expected {want}")
        if LAYOUT in n.meta:
            clone.meta[LAYOUT] = n.meta[LAYOUT]
        env[n] = clone
    return env[chain.nodes[-1]]


