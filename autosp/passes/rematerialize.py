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
memory-bound pass per value (a norm: read x, write n).

Across a long stretch of compute, and only there, a value may also be made again through
matmuls and autosp's collectives (at most ``MAX_COSTLY_NODES`` ops), when their estimated time
is at most 1/``COSTLY_SHARE`` of the stretch's. These are the values a layer's backward makes
before its MLP backward and reads again only after it: ``o_proj``'s input (attention's output,
back in sequence shards by an all-to-all) and output (one matmul from it), and with ``"full"``
attention's inputs ``q``, ``k``, ``v`` (input norm, projections, rotary embedding, all-to-all).
The stretch (an MLP backward) is linear in the length, a small part of a layer's backward at
long sequences (attention's is quadratic): at 256K tokens a rank, about 0.1 s of some 4.5 s.
The budget is per value, and a chain several values share is made once (below): with
``"attention_out"`` one all-to-all and one matmul more per layer, with ``"full"`` two and four,
about 20 ms a layer at 256K tokens a rank, by the estimate. A stretch with an attention call in
it never qualifies (its budget would be a share of attention's time). Every rank runs the same
graph, so the extra collectives are issued in the same order everywhere; they are exact too
(the same kernel on the same inputs). Values are taken in the order of their first late use, so
that a chain they share (an all-to-all and what it sends) is made again once and serves them
all. A view (a ``split``'s outputs, a collective's wait) is alive where the memory it reads is:
a copy that read the old all-to-all's output late would keep it alive. An offloaded input is
the exception: it is reloaded where it is read, so a view of it is taken again there. Inductor's CPU code for the reference widths
(``benchmarks/inductor_peak.py --as-if-tokens 262144``, 3 layers) puts the backward's peak at
9.96 -> 8.27 units with ``"full"`` and 8.49 -> 8.30 with ``"attention_out"`` (one unit: an
``[S/P, hidden]`` bf16 value; not measured on a GPU). Switched off by
``disable_passes=("rematerialize",)``.
"""

from __future__ import annotations

import itertools
import operator

import torch
import torch.fx as fx

from autosp.graph_utils import tensor_bytes, val
from autosp.passes.memory_plan import HBM_BYTES_PER_S, MIN_STRETCH_S
from autosp.passes.offload import compute_seconds, cumulative_seconds

MIN_FRACTION = 64  # values of at least 1/64 the size of the graph's largest (a weight, at short lengths)
LONG_STRETCH = 32  # compute between two uses worth recomputing for: 32x the value's memory pass
MAX_NODES = 32  # ops recomputed for one value at most
MAX_COSTLY_NODES = 64  # the same, where matmuls and collectives may be among them
COSTLY_SHARE = 4  # matmuls and collectives recomputed: at most 1/4 of the stretch's estimated time
LINK_BYTES_PER_S = 200e9  # an all-to-all's output bytes per second (2x H200 NCCL: 206 GB/s at 64 MiB)
_COPIES = {"_to_copy", "clone", "to", "convert_element_type", "alias", "_unsafe_view"}  # _unsafe_view: a reshape
_MATMULS = {"mm", "addmm", "bmm", "baddbmm"}
_COLLECTIVES = {"all_to_all_single", "all_gather_into_tensor", "wait_tensor"}
_LAYOUT = {"cat", "stack", "split_with_sizes", "split"}  # copies (cat, stack) or views of several inputs


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
    candidates = [n for n in nodes if n.op == "call_function" and not _is_view(n) and sizes[n]
                  and sizes[n] * MIN_FRACTION >= largest]
    # The order: by the first late use. A value made again for an earlier late use then serves
    # the later ones (o_proj's output is read again before its input is): one copy of a chain
    # they share, one all-to-all more rather than one per value.
    first = {}
    memo: dict[fx.Node, tuple[float, bool, bool]] = {}  # per node: facts that copies leave unchanged
    state = _positions(graph, memo)
    for node in candidates:
        options = _options(node, sizes, *state)
        if options:
            first[node] = state[0][options[0][0][0]]
    made: dict[fx.Node, fx.Node] = {}  # value -> the copy made of it for later users
    done, state = [], None
    for node in sorted(first, key=first.get):
        state = state or _positions(graph, memo)  # the graph as it is now (copies were inserted)
        pos = state[0]
        subgraph, late = None, []
        for late, budget_s in _options(node, sizes, *state):
            subgraph = _recomputable(node, pos[late[0]], pos, sizes, made, offloaded, budget_s=budget_s)
            if subgraph is not None:
                break
        if subgraph is None:
            continue
        reads = _reads(node)
        for user in late:  # the views between the value and its late users are made again too
            subgraph |= _view_chain(node, reads[user])
        clones = {old: new for old, new in made.items() if pos[new] < pos[late[0]]}
        with graph.inserting_before(late[0]):
            for old in sorted(subgraph, key=pos.get):
                clones[old] = made[old] = graph.node_copy(old, lambda a, c=clones: c.get(a, a))
        for user in late:
            user.replace_input_with(reads[user], clones[reads[user]])
        done.append(node.name)
        state = None
    if done:
        graph.lint()
        gm.recompile()
    return done


def _positions(graph: fx.Graph, memo: dict) -> tuple[dict, list[int], list[int], list[float]]:
    """Each node's position, the attention backwards' positions, every attention call's
    (forward or backward), the cumulative compute time. Called again after every insertion:
    ``memo`` keeps each node's compute time and kind, so a call costs a walk of the graph, not an
    estimate per node (the pass on 16 layers of the reference shape: 2.5 s -> 1.1 s)."""
    def facts(n: fx.Node) -> tuple[float, bool, bool]:
        if n not in memo:
            memo[n] = (compute_seconds(n), _is_attention_backward(n), _is_attention(n))
        return memo[n]

    pos = {n: i for i, n in enumerate(graph.nodes)}
    return (pos, [pos[n] for n in graph.nodes if facts(n)[1]], [pos[n] for n in graph.nodes if facts(n)[2]],
            cumulative_seconds(graph, lambda n: facts(n)[0]))


def _options(node: fx.Node, sizes: dict, pos: dict, attention: list[int], any_attention: list[int],
             seconds: list[float]) -> list:
    """Where ``node`` could be made again, in the order to try: ``(late users, budget_s)``, with
    cheap ops alone (budget 0) after an attention backward or a long stretch, then through
    matmuls and collectives across a long stretch with no attention in it (its budget a share of
    the stretch's matmuls, never of attention's time). Trying the earlier split first instead
    made Inductor's CPU estimate of ``"full"`` worse (8.27 -> 9.27 units)."""
    reads = _reads(node)  # user -> the node or view of it that it reads
    uses = sorted({pos[u] for u in reads})
    long_s = max(LONG_STRETCH * 2 * sizes[node] / HBM_BYTES_PER_S, MIN_STRETCH_S)
    out = []
    split = _split(uses, attention, seconds, long_s)
    if split is not None:
        out.append((sorted((u for u in reads if pos[u] > split), key=pos.get), 0.0))
    gap = _long_gap(uses, seconds, long_s, no_attention=any_attention)
    if gap is not None:
        out.append((sorted((u for u in reads if pos[u] > gap[0]), key=pos.get), gap[1] / COSTLY_SHARE))
    return out


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
    gap = _long_gap(uses, seconds, long_s)
    return None if gap is None else gap[0]


def _long_gap(uses: list[int], seconds: list[float], long_s: float,
              no_attention: list[int] = ()) -> tuple[int, float] | None:
    """The last gap between two uses with at least ``long_s`` of estimated compute in it and
    none of the positions ``no_attention`` inside: (the position of its first use, its seconds),
    or None."""
    gaps = [(a, seconds[b] - seconds[a + 1]) for a, b in itertools.pairwise(uses)
            if not any(a < x < b for x in no_attention)]
    gaps = [g for g in gaps if g[1] >= long_s]
    return gaps[-1] if gaps else None


def _recomputable(node: fx.Node, at: int, pos: dict, sizes: dict, made: dict,
                  offloaded: frozenset[str] = frozenset(), budget_s: float = 0.0) -> set[fx.Node] | None:
    """The ops to run again to make ``node`` at graph position ``at``, or None when it cannot be
    done cheaply (see the module docstring). Values already made again before ``at`` (``made``)
    are used as they are. With ``budget_s``, matmuls and collectives may be among the ops, as long
    as their estimated time stays within it."""
    if node in made and pos[made[node]] < at:
        return set()  # made again already, for an earlier late use
    need: set[fx.Node] = set()
    stack = [node]
    spent = 0.0
    while stack:
        n = stack.pop()
        if n in need:
            continue
        if not _cheap(n):
            if not budget_s or not _costly(n):
                return None
            spent += _costly_seconds(n)
            if spent > budget_s:
                return None
        need.add(n)
        if len(need) > (MAX_COSTLY_NODES if budget_s else MAX_NODES):
            return None
        for a in n.all_input_nodes:
            # A view is alive where the memory it reads is: decide at its base, and make a view
            # again from the base's latest copy (an older copy of the view may read an older copy
            # of the base, which it would then keep alive; CPU estimate of "full": 8.27 -> 8.77).
            base = _base(a)
            if base.op == "placeholder" and base.name in offloaded:
                base = a  # but an offloaded input is reloaded where it is read: decide at the view
            if base is not a and base in made and pos[made[base]] < at:
                stack.append(a)  # the view again, of the base made again
                continue
            resident = base.op == "get_attr" or base.op == "placeholder" and base.name not in offloaded
            alive = resident or any(pos[u] >= at for u in _reads(base))
            if alive or sizes.get(base, 0) * 16 <= sizes[node] or (a in made and pos[made[a]] < at):
                continue  # an input there anyway, or a small one held a little longer
            stack.append(a)
    return need


def _base(node: fx.Node) -> fx.Node:
    """The node whose memory ``node`` reads (itself unless it is a view)."""
    while _is_view(node):
        node = node.args[0]
    return node


def _op_name(node: fx.Node) -> str:
    """The aten-level op's name of a call (``"mm"``, ``"wait_tensor"``), or ``""``."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return ""
    return node.target._overloadpacket.__name__


def _costly(node: fx.Node) -> bool:
    """Matmuls, collectives and multi-input layout ops: recomputed only within a budget."""
    return _op_name(node) in _MATMULS | _COLLECTIVES | _LAYOUT


def _costly_seconds(node: fx.Node) -> float:
    """Estimated seconds: a matmul at the device's ceiling, a collective at ``LINK_BYTES_PER_S``
    over its output's bytes, a layout op (a memory pass) nothing."""
    name = _op_name(node)
    if name in _COLLECTIVES and name != "wait_tensor":
        return tensor_bytes(val(node)) / LINK_BYTES_PER_S
    return compute_seconds(node)


def _cheap(node: fx.Node) -> bool:
    target = node.target
    if node.op == "call_function" and target is operator.getitem:
        return _is_view(node)  # one output of a split: a view
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return (torch.Tag.pointwise in target.tags or torch.Tag.reduction in target.tags or target.is_view
            or target._overloadpacket.__name__ in _COPIES)


def _is_view(node: fx.Node) -> bool:
    """Whether ``node`` reads its first input's memory and makes none of its own: a view op, one
    output of a view op with several (a ``split``'s ``getitem``), or a collective's wait (it
    returns the collective's own buffer)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return _is_view(node.args[0])
    return (isinstance(node.target, torch._ops.OpOverload) and node.target.is_view) or _op_name(node) == "wait_tensor"


def _is_attention(node: fx.Node) -> bool:
    return "attention" in _op_name(node)


def _is_attention_backward(node: fx.Node) -> bool:
    return _is_attention(node) and "backward" in _op_name(node)
