"""rematerialize: cheap values are computed again after attention's backward, not held through it.

Runs on the backward graph AOTAutograd's partitioner made (the backend calls it, like the
offload passes), when ``Config.recompute`` makes the backward recompute the layers. A layer's
backward recomputes its input norm once and uses it twice: for the q, k, v projections before
attention, and for their weight gradients after attention's backward. In between lies the
attention backward, the step's peak at long sequences, and the norm's output (one
``[S/P, hidden]`` value) is held through it. On one H200 at 256K tokens with
``recompute="blocks"`` the peak of a layer's backward held four such values besides attention's
own (``benchmarks/memory_breakdown.py``); by Inductor's generated code the norm's output is one
of them. This pass computes such a value a second time for its late users, from values that
are alive there anyway (measured: 4 layers at 256K, 14.36 -> 13.82 GiB)::

    n = mul(mul(x_f32, rsqrt), w)          # the norm, recomputed for the projections
    q = mm(n, Wq) ...                      # early users
    dq, dk, dv = attention_backward(...)   # the peak
    dWq = mm(t(n), dq) ...                 # late users: n alive through the peak
    ->
    ... the same early part ...
    n2 = mul(mul(x_f32, rsqrt), w)         # again, right before the first late user
    dWq = mm(t(n2), dq) ...                # n is freed after the projections

Which values: made in the backward graph, at least ``MIN_FRACTION`` of the largest value's
size, with an attention backward between two of their uses, or a stretch of estimated compute
(matmuls and attention, ``offload.cumulative_seconds``) of at least ``LONG_STRETCH`` times the
value's memory pass and ``MIN_STRETCH_S`` (a layer's MLP backward at long sequences). It runs
before the reload pass, so a value made from an offloaded input reads the input where it is
reloaded (an offloaded input counts as alive only while it is read). What may be recomputed: a chain
of at most ``MAX_NODES`` pointwise, reduction and view ops (no matmul, no attention, no
collective, no random op) whose inputs are graph inputs, values alive at the late use anyway,
or small values (at most 1/16 of the value's size, held a little longer). Exact up to the
order of a reduction inside a fused kernel (the same ops on the same inputs). The cost is one
memory-bound pass per value (a norm: read x, write n). Switched off by
``disable_passes=("rematerialize",)``.
"""

from __future__ import annotations

import itertools

import torch
import torch.fx as fx

from autosp.graph_utils import tensor_bytes, val
from autosp.passes.memory_plan import HBM_BYTES_PER_S, MIN_STRETCH_S
from autosp.passes.offload import cumulative_seconds

MIN_FRACTION = 64  # values of at least 1/64 the size of the graph's largest (a weight, at short lengths)
LONG_STRETCH = 32  # compute between two uses worth recomputing for: 32x the value's memory pass
MAX_NODES = 32  # ops recomputed for one value at most
_COPIES = {"_to_copy", "clone", "to", "convert_element_type", "alias"}


def rematerialize_pass(gm: fx.GraphModule, offloaded: frozenset[str] = frozenset()) -> list[str]:
    """Recompute cheap values after the attention backward (or the long stretch of compute)
    they were held through; returns the names of the values recomputed. ``offloaded``: names of
    placeholders that the offload passes will reload from host memory (alive only while used)."""
    graph = gm.graph
    nodes = list(graph.nodes)
    if not any(_is_attention_backward(n) for n in nodes):
        return []
    sizes = {n: tensor_bytes(val(n)) for n in nodes}
    largest = max(sizes.values(), default=0)
    made: dict[fx.Node, fx.Node] = {}  # value -> the copy made of it for later users
    done, pos = [], None
    for node in nodes:
        if node.op != "call_function" or _is_view(node) or sizes[node] == 0 or sizes[node] * MIN_FRACTION < largest:
            continue
        if pos is None:  # positions of the graph as it is now (copies were inserted)
            pos = {n: i for i, n in enumerate(graph.nodes)}
            attention = [pos[n] for n in graph.nodes if _is_attention_backward(n)]
            seconds = cumulative_seconds(graph)
        reads = _reads(node)  # user -> the node or view of it that it reads
        split = _split(sorted({pos[u] for u in reads}), attention, seconds,
                       max(LONG_STRETCH * 2 * sizes[node] / HBM_BYTES_PER_S, MIN_STRETCH_S))
        if split is None:
            continue
        late = sorted((u for u in reads if pos[u] > split), key=pos.get)
        subgraph = _recomputable(node, pos[late[0]], pos, sizes, made, offloaded)
        if subgraph is None:
            continue
        for user in late:  # the views between the value and its late users are made again too
            subgraph |= _view_chain(node, reads[user])
        clones = {old: new for old, new in made.items() if pos[new] < pos[late[0]]}
        with graph.inserting_before(late[0]):
            for old in sorted(subgraph, key=pos.get):
                clones[old] = made[old] = graph.node_copy(old, lambda a, c=clones: c.get(a, a))
        for user in late:
            user.replace_input_with(reads[user], clones[reads[user]])
        done.append(node.name)
        pos = None
    if done:
        graph.lint()
        gm.recompile()
    return done


def _reads(node: fx.Node) -> dict[fx.Node, fx.Node]:
    """The users that read ``node``'s memory, through views: user -> what it reads (node or a view
    of it)."""
    out = {}
    for user in node.users:
        if _is_view(user):
            out.update(_reads(user))
        else:
            out[user] = node
    return out


def _view_chain(node: fx.Node, view: fx.Node) -> set[fx.Node]:
    """The views from ``node`` to ``view`` (``view`` included; empty when it is node itself)."""
    chain = set()
    while view is not node:
        chain.add(view)
        view = view.args[0]
    return chain


def _split(uses: list[int], attention: list[int], seconds: list[float], long_s: float) -> int | None:
    """Where the uses (graph positions, sorted) split into early and late: the last attention
    backward between two of them, else the last gap between two uses with at least ``long_s``
    of estimated compute in it (None: neither)."""
    if len(uses) < 2:
        return None
    inside = [a for a in attention if uses[0] < a < uses[-1]]
    if inside:
        return inside[-1]
    gaps = [a for a, b in itertools.pairwise(uses) if seconds[b] - seconds[a + 1] >= long_s]
    return gaps[-1] if gaps else None


def _recomputable(node: fx.Node, at: int, pos: dict, sizes: dict, made: dict,
                  offloaded: frozenset[str] = frozenset()) -> set[fx.Node] | None:
    """The ops to run again to make ``node`` at graph position ``at``, or None when it cannot be
    done cheaply (see the module docstring). Values already made again before ``at`` (``made``)
    are used as they are."""
    need: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in need:
            continue
        if not _cheap(n):
            return None
        need.add(n)
        if len(need) > MAX_NODES:
            return None
        for a in n.all_input_nodes:
            resident = a.op == "get_attr" or a.op == "placeholder" and a.name not in offloaded
            alive = resident or any(pos[u] >= at for u in _reads(a))
            if alive or sizes.get(a, 0) * 16 <= sizes[node] or (a in made and pos[made[a]] < at):
                continue  # an input there anyway, a small one held a little longer, or made again
            stack.append(a)
    return need


def _cheap(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return (torch.Tag.pointwise in target.tags or torch.Tag.reduction in target.tags or target.is_view
            or target._overloadpacket.__name__ in _COPIES)


def _is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target.is_view


def _is_attention_backward(node: fx.Node) -> bool:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    name = node.target._overloadpacket.__name__
    return "attention" in name and "backward" in name
