"""grad_reduce: parameter gradients averaged over the group inside the compiled backward.

Under the gradient convention (README, "Layouts and the gradient convention") a rank's parameter
gradients are partial: their mean over the group is the one-device gradient, taken after the
backward by ``autosp.reduce_gradients`` (or DDP/FSDP). With ``Config.overlap_grad_reduce`` the
compiled backward takes that mean itself, each parameter's as soon as the backward has finished
its gradient, so the all-reduces of the last layers run while the backward works on the first
ones (the backward is one graph: after it, every gradient would wait for the whole of it)::

    p = placeholder                      # a parameter (Dynamo lifts them as graph inputs)
    ... linear(x, p) ...
    ->
    p = placeholder
    p_mean = collectives.mean_grad(p, "g", 2)     # identity; backward: all_reduce(avg) (NCCL) or all_reduce(sum) / P
    ... linear(x, p_mean) ...

``"g"`` is a second process group over the sequence-parallel ranks (``backend.gradient_group_name``):
one communicator runs its collectives in turn on one stream, and on the sequence-parallel
group a layer's gradient all-reduces would go ahead of the all-to-all the attention backward
waits for (measured on 2x H200 at 16K: 0.6 ms of idle device a layer). Where the ranks cannot
make that group safely, ``"g"`` is the sequence-parallel group itself (the plan says so).

One use is not averaged: an embedding of the sequence shard (``F.embedding(ids_BL, table)``)
becomes ``collectives.embedding_gathered_grad``, whose backward all-gathers the token gradients
and runs the embedding backward of the whole sequence on every rank: the table's gradient is
then the same on every rank (its own mean), made from ``B x S x D`` values instead of an
all-reduce of the ``V x D`` table after the last layer's backward, where nothing is left to hide
it. The embedding backward there is ``autosp::embedding_grad``, torch's deterministic kernel:
Inductor's own lowering (atomic adds) gives different last bits from rank to rank, and the
ranks' copies of the table would drift apart. Only where the batch has fewer tokens than the
table has rows (Llama-3's 128K vocabulary: below 128K tokens); beyond, the all-reduce moves
less. A table tied to the output projection keeps ``mean_grad`` for that use, whose all-reduce
then starts early in the backward. The backward also needs every rank's ids: where the ids are
this rank's cut of the whole ids every rank was given (the usual case), they are that whole value,
padded as the cut pads it; otherwise the forward gathers them.

AOTAutograd traces ``mean_grad``'s backward into the backward graph as an all-reduce and its
wait; autograd runs that backward last (the node is the oldest of the forward), so the
partitioner leaves every one of them at the end of the backward graph. ``sink_grad_waits`` (run
on the backward graph the partitioner made) moves each all-reduce up to right after the
gradient it reduces, and its wait (with the ``/ P`` after it, where the backend cannot average) down to the end of the graph: the
collective runs while the rest of the backward computes, and nothing waits for it before the end
(Inductor compiles that graph without its peak-memory reordering, which pulled the waits back
into the layers). Every rank makes the same moves, so the collectives keep one order across the
group.

The gradients leave the region as the group mean: ``reduce_gradients`` is not needed after it
(it is harmless: the mean of equal tensors), and with DDP/FSDP over a data-parallel dimension
the SP mean composes with theirs.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from autosp import collectives
from autosp._torch_private import collective_wait_op, fake_mode_of, size_hint
from autosp.graph_utils import new_node, tensor_bytes, val
from autosp.layout import SEQ
from autosp.passes._context import layout_of


def grad_reduce_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Route every parameter the region reads through ``collectives.mean_grad``, except where an
    embedding of a sequence shard reads it: that use becomes ``collectives.embedding_gathered_grad``."""
    plan = gm.meta.get("autosp.plan")
    if not cfg.options.overlap_grad_reduce or cfg.world == 1 or cfg.group_name is None:
        return gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = [n for n, x in zip(placeholders, example_inputs, strict=False)
              if isinstance(x, torch.nn.Parameter) and x.requires_grad and n.users]
    if not params:
        if plan is not None:
            plan.note("grad_reduce: the region reads no parameter that needs a gradient")
        return gm
    fake_mode = fake_mode_of([val(n) for n in placeholders])
    gathered = []
    for p in params:
        for use in list(p.users):
            embedding = _sharded_embedding(use, p, cfg.world)
            if embedding is None:
                continue
            ids, padding_idx, seq_dim = embedding
            with gm.graph.inserting_before(use):  # the token gradients travel with the all-to-alls
                whole = _whole_ids(ids, gm.graph, use, fake_mode)
                new = new_node(gm.graph, collectives.embedding_gathered_grad,
                               (ids, p, padding_idx, cfg.group_name, cfg.world, seq_dim, whole), like=use,
                               fake_mode=fake_mode, name_hint=f"{use.name}_gathered_grad")
            use.replace_all_uses_with(new)
            gm.graph.erase_node(use)
            gathered.append(p)
    averaged = [p for p in params if any(u.target is not collectives.embedding_gathered_grad for u in p.users)]
    group = cfg.grad_group_name or cfg.group_name
    with gm.graph.inserting_after(placeholders[-1]):
        for p in reversed(averaged):  # each right after the placeholders, in parameter order
            users = [u for u in p.users if u.target is not collectives.embedding_gathered_grad]
            mean = new_node(gm.graph, collectives.mean_grad, (p, group, cfg.world), like=None,
                            fake_mode=fake_mode, name_hint=f"{p.name}_mean_grad")
            for u in users:
                u.replace_input_with(p, mean)
    gm.recompile()
    if plan is not None:
        total = sum(tensor_bytes(val(p)) for p in averaged)
        where = "their own communicator" if cfg.grad_group_name else "the sequence-parallel communicator"
        plan.note(f"grad_reduce: {len(averaged)} parameter gradients ({total / 2**20:.1f} MiB) averaged over the "
                  f"group in the backward on {where}, each as soon as it is complete (reduce_gradients is not "
                  "needed)"
                  + (f"; the embedding gradient of {', '.join(p.name for p in gathered)} made on every rank from the "
                     "gathered token gradients, not all-reduced" if gathered else ""))
    return gm


def _whole_ids(ids: fx.Node, graph: fx.Graph, like: fx.Node, fake_mode) -> fx.Node | None:
    """Every rank's ids side by side, made here without communication, where ``ids`` is this
    rank's cut of a whole value every rank holds (``shard_seq`` of it, the sequence neither
    flattened with other dims): that value padded as the cut pads it. The forward then gathers
    no ids (at 16K tokens on 2x H200: one collective less where the step starts, its device idle
    while the host launches its first kernels). None otherwise (the ids are gathered)."""
    if ids.op != "call_function" or ids.target is not collectives.shard_seq:
        return None
    whole, _, world, dim, length, outer, inner, pad_value = ids.args
    if outer != 1 or inner != 1:
        return None
    return new_node(graph, collectives.pad_to_shards, (whole, world, dim, length, pad_value), like=like,
                    fake_mode=fake_mode)


def _sharded_embedding(node: fx.Node, weight: fx.Node, world: int) -> tuple[fx.Node, int | None, int] | None:
    """``(ids, padding_idx, sequence dim)`` where ``node`` is ``F.embedding`` of ``weight`` over ids
    sharded along the sequence alone (not flattened), with no max_norm, no scaling by frequency and
    a dense gradient, and fewer tokens in the whole (padded) batch than the table has rows: the
    gathered token gradients are then smaller than the table's gradient (beyond that, at 128K
    tokens for a Llama-3 vocabulary, the all-reduce of the table moves less and holds no
    ``B x S x D`` buffer); else None."""
    if node.op != "call_function" or node.target is not torch.nn.functional.embedding:
        return None
    names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    args = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
    ids, lay = args.get("input"), layout_of(args.get("input"))
    if args.get("weight") is not weight or ids is weight or lay is None or lay.kind != SEQ:
        return None
    if lay.outer != 1 or lay.inner != 1 or args.get("max_norm") is not None or args.get("scale_grad_by_freq") \
            or args.get("sparse"):
        return None
    tokens = math.prod(size_hint(d) for d in val(ids).shape) * world
    if tokens >= size_hint(val(weight).shape[0]):
        return None
    return ids, args.get("padding_idx"), lay.dim


def sink_grad_waits(gm: fx.GraphModule) -> int:
    """Schedule the gradient all-reduces of the backward graph for overlap; returns how many.

    A gradient all-reduce is a collective whose wait goes, through a short tail such as ``/ P``,
    only to the graph's output. Autograd runs ``mean_grad``'s backward last (its node is the
    oldest of the forward), so the partitioner puts all of them at the end of the backward: each
    collective moves up to right after the last of its inputs, its wait and tail down to the end.
    (A node moved up keeps its inputs ahead of it; one moved down with everything it reaches
    keeps its users after it.) The all-reduces run on their own communicator where the ranks
    could make one (``backend.gradient_group_name``), so none of them delays an all-to-all the
    compute waits for, and Inductor compiles the graph in this order (its peak-memory order
    would pull the waits back up)."""
    graph = gm.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    wait_op = collective_wait_op()
    moved = 0
    # Moving nodes keeps the order of the others: one numbering serves to find a collective's
    # last input (never a moved node: those lead to the output alone).
    order = {n: i for i, n in enumerate(graph.nodes)}
    for wait in [n for n in graph.nodes if n.op == "call_function" and n.target is wait_op]:
        tail = tail_to_output(wait, output)
        collective = wait.args[0]
        if tail is None or not isinstance(collective, fx.Node) or collective.op != "call_function":
            continue
        for n in tail:  # in graph order
            output.prepend(n)
        inputs = collective.all_input_nodes
        last_input = max(inputs, key=order.__getitem__) if inputs else next(iter(graph.nodes))
        last_input.append(collective)
        moved += 1
    if moved:
        graph.lint()
        gm.recompile()
    return moved


TAIL = 4  # at most this many nodes from a wait to the output (wait, / P, a dtype cast, a view)


def tail_to_output(wait: fx.Node, output: fx.Node) -> list[fx.Node] | None:
    """``wait`` and the nodes it reaches, in graph order, when they are a short tail that ends in
    ``output`` (a gradient on its way out); else None (a wait whose result feeds more work)."""
    chain, frontier = {wait}, [wait]
    while frontier:
        for u in frontier.pop().users:
            if u is not output and u not in chain:
                chain.add(u)
                frontier.append(u)
                if len(chain) > TAIL:
                    return None
    if not any(output in n.users for n in chain):
        return None
    return [n for n in output.graph.nodes if n in chain]
