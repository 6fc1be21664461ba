"""peer_exchange: the all-to-alls of the partitioned graphs carried by the copy engines.

With ``Config.exchange="peer_copy"`` (CUDA, every rank of the group on one host), each
all-to-all of the sequence-parallel group in the forward and backward graphs AOTAutograd made
(torch's functional op and its wait) becomes the two halves of ``kernels.peer_exchange``::

    c = _c10d_functional.all_to_all_single(x, out_splits, in_splits, group)
    ... work that does not read c (the own q/k/v chunk, deferred weight gradients) ...
    y = _c10d_functional.wait_tensor(c)
    ->
    t = autosp.peer_exchange_start(x, out_splits, in_splits, group, site, capacity, timeout)
    ...
    y = autosp.peer_exchange_finish(t, x, out_splits, in_splits, group, site)

where NCCL's kernel needs SMs the work between the two holds (it starts when that work lets
them go: 2x H200, 16K), the copy engines need none. It runs last on each graph, after the
passes that place work between a collective and its wait (``defer_weight_grads``), and keeps
their order. Other collectives (the gradient all-reduces, the gathers) stay NCCL's.

What the runtime needs, checked here for the whole graph (else the graph keeps NCCL, and the plan
says why): every exchange's splits are plain integers whose nonzero entries are one block size
(equal splits; the head split's, nothing to itself), so that ``capacity``, the largest row block
of the graph in bytes and the receive buffers' size, is the same on every rank (every rank
compiles the same graph); static shapes (the buffers are sized by the graph); at most
``SITES`` exchanges; and the exchanges finish in the order they started (``finish`` pairs with
the oldest exchange in flight). ``site`` is the exchange's place in its graph (the forward's from
0, the backward's from ``SITES``); the ready flag carries it, so ranks whose exchanges went out
of order wait (until the watchdog ends them) rather than read another exchange's rows, unless
the two have the same place in two graphs. The graph is then compiled in its own order
(Inductor's peak-memory reordering could move a start after a later finish). Each exchanged
tensor is made one contiguous buffer of Inductor's (``_torch_private.realize_to_strides``, after
a copy node where its value is strided): Inductor would otherwise lay it out as its producer
suits (the output all-to-all's heads and positions swapped), and the start would copy it on the
compute stream with ATen's strided copy.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.fx as fx

from autosp._torch_private import collective_wait_op, fake_mode_of, is_symbolic, realize_to_strides
from autosp.config import EXCHANGE_TIMEOUT_S
from autosp.graph_utils import new_node, val

A2A = torch.ops._c10d_functional.all_to_all_single.default
SITES = 2048  # forward sites 0..2047, backward 2048..4095: the 12 bits the ready flag carries


def peer_exchange_pass(gm: fx.GraphModule, group_name: str, world: int, backward: bool,
                       require_cuda: bool = True, timeout: float = EXCHANGE_TIMEOUT_S) -> tuple[int, str | None]:
    """Replace the group's all-to-alls; returns (how many, why none were where some exist).
    ``timeout``: ``Config.exchange_timeout_s``, handed to every start (the watchdog's limit).
    (``require_cuda=False``: the rewrite of a CPU graph, which compiles but cannot run: tests.)"""
    import autosp.kernels.peer_exchange  # noqa: F401  (registers the ops)

    start_op, finish_op = torch.ops.autosp.peer_exchange_start.default, torch.ops.autosp.peer_exchange_finish.default
    wait_op = collective_wait_op()
    sites = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is A2A and n.args[3] == group_name]
    if not sites:
        return 0, None
    pairs = []
    for c in sites:
        x, out_splits, in_splits, _ = c.args
        waits = list(c.users)
        if len(waits) != 1 or waits[0].target is not wait_op:
            return 0, f"{c.name} is read otherwise than by one wait"
        if not all(isinstance(s, int) for s in (*out_splits, *in_splits)) or len(out_splits) != world \
                or len(in_splits) != world:
            return 0, f"{c.name}'s splits are not {world} plain integers"
        if len({s for s in (*out_splits, *in_splits) if s}) > 1:  # then every rank's block is the same size
            return 0, f"{c.name} sends or receives row blocks of different sizes ({in_splits} -> {out_splits})"
        if any(is_symbolic(d) for d in val(x).shape):
            return 0, f"{c.name}'s shape is symbolic (the receive buffers are sized by the graph)"
        if require_cuda and val(x).device.type != "cuda":
            raise ValueError(f"option exchange='peer_copy' moves CUDA tensors; {c.name} sends one on {val(x).device}")
        pairs.append((c, waits[0]))
    if len(pairs) > SITES:
        return 0, f"it has {len(pairs)} all-to-alls, more than the {SITES} sites a graph may number"
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_wait = sorted(pairs, key=lambda p: order[p[1]])
    if [c for c, _ in by_wait] != [c for c, _ in pairs]:
        return 0, "its all-to-alls do not finish in the order they start"
    capacity = 0
    for c, _ in pairs:
        x = val(c.args[0])
        row = math.prod(int(d) for d in x.shape[1:]) * x.element_size()
        capacity = max(capacity, row * max(*c.args[1], *c.args[2]))
    base = SITES if backward else 0
    for i, (c, wait) in enumerate(pairs):
        x, out_splits, in_splits, _ = c.args
        site = base + i
        with gm.graph.inserting_before(c):
            if not val(x).is_contiguous():  # one contiguous copy, read by the start, held by the finish
                x = _contiguous(gm.graph, x)
            realize_to_strides(x)  # one contiguous buffer in Inductor's code too
            start = gm.graph.call_function(start_op,
                                           (x, list(out_splits), list(in_splits), group_name, site, capacity,
                                            float(timeout)))
        start.meta.update({k: v for k, v in c.meta.items() if k in ("stack_trace", "nn_module_stack", "seq_nr")})
        start.meta["val"] = val(x).new_empty(0)
        with gm.graph.inserting_before(wait):
            finish = gm.graph.call_function(finish_op,
                                            (start, x, list(out_splits), list(in_splits), group_name, site))
        # the wait's metadata but its eager input values (Inductor would read them as the finish's arguments)
        finish.meta = {k: v for k, v in wait.meta.items() if k != "eager_input_vals"}
        wait.replace_all_uses_with(finish)
        gm.graph.erase_node(wait)
        gm.graph.erase_node(c)
    gm.graph.lint()
    gm.recompile()
    return len(pairs), None


def _contiguous(graph: fx.Graph, x: fx.Node) -> fx.Node:
    """``x`` copied contiguous, as one node read by both ops (a copy each op made for itself would
    leave the finish holding one the exchange never read)."""
    return new_node(graph, torch.ops.aten.clone.default, (x,), {"memory_format": torch.contiguous_format},
                    like=x, fake_mode=fake_mode_of([val(x)]) or contextlib.nullcontext())
