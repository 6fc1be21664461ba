"""defer_weight_grads: weight-gradient matmuls moved into the backward's all-to-all waits.

In the backward of a sequence-parallel layer every all-to-all is waited for at once: autograd's
backward of a collective issues it and waits (torch's ``all_to_all_single`` backward), and
what follows reads its result (the attention backward reads the gradient of attention's output,
the q, k, v projections' backward reads theirs). The device then does nothing while the data
crosses: at 16K tokens on 2x H200 that was 32 all-to-alls a step in the backward, about 4 ms
(benchmarks/RESULTS.md, 2026-11-29). Work that does not depend on the all-to-all can fill the
wait, and the backward has such work: the weight gradients. ``dW = dY^T X`` is read by nothing
but the graph's output (or, with ``overlap_grad_reduce``, its all-reduce on the way there), so
it can run later than autograd put it without delaying anything::

    dX_o = mm(dY, W_o); dW_o = mm(dY^T, attn)            # o_proj backward
    c = all_to_all_single(dX_o); w = wait_tensor(c)      # the device waits here
    ... attention backward(w) ...
    ->
    dX_o = mm(dY, W_o)
    c = all_to_all_single(dX_o)
    dW_o = mm(dY^T, attn)                                 # runs while the data crosses
    w = wait_tensor(c)

For each collective whose result feeds compute (in graph order; not a gradient's all-reduce,
which is waited for at the end, nor a wait on what is no collective, such as a second wait on
the gathered embedding gradient's view), the matmuls made before it that it does not wait for (what
it sends is never moved past it) and not yet moved are taken latest first (the shortest
lifetimes to stretch) and put between the collective and its wait, in that order, until their
estimated time covers the collective's estimated time (``COVER`` times over: a matmul longer
than the wait delays nothing, the work runs anyway) or nothing is left. (Moved shortest first
instead, they broke the graph's order in full recompute's backward, where a moved matmul's
tail holds the recomputed q/k/v pack of a later all-to-all.)

Why the first one is split: NCCL's kernel gets the device only when the kernel launched beside
it frees SMs. A cuBLAS matmul queued behind the collective takes every SM first (the
collective's stream still waits on an event), and NCCL's kernel starts when it ends (2x H200,
16K, trace of 2026-11-30 about 02:40 UTC, code e54b384: in a window opened by a 0.09 ms matmul
the all-to-all started as that ended and ran beside the next; in one opened by a single 0.40 ms
weight gradient it started 0.33 ms in, and half of it, 0.09 ms, was exposed, in each of 16
layers). So a first matmul estimated longer than ``4 x HEAD_S`` is split by output rows,
``mm(a, b) -> cat([mm(a[:m], b), mm(a[m:], b)])``, into a head of about ``HEAD_S`` (a multiple
of ``HEAD_ROWS`` rows) and the rest: every output row is the same sum as before, and Inductor
writes both into one buffer. Expected: most of the exposed part of those all-to-alls, about
1.35 ms a step at 16K. Measured (2x H200, 2026-11-30, benchmarks/RESULTS.md): no gain beyond
the calls' spread (step 0.199-0.201 s as before); kept as exact and harmless.

The nodes after a moved matmul that lay before the collective go with it (a transpose); a
gradient all-reduce among them goes after the wait (a matmul whose all-reduce is waited for
by a wait that stays before the window's, sunk to the end ahead of it, is not moved: its
all-reduce would follow its own wait): NCCL's all-reduce beside the all-to-all
slowed it (2x H200, 16K: with the all-reduces in the windows the all-to-alls took 2.3x
NCCL-alone's time, 1.1x without). GEMMs and NCCL's
all-to-all share the device well; cuDNN's attention and NCCL do not (measured on 2x H200: the
attention backward beside 8 all-to-alls took longer than the two one after the other), so only
matmuls are moved. On 2x H200 at 16K tokens (benchmarks/RESULTS.md, 2026-11-30) the step went
from 0.204 to 0.202 s with it (one call, both modes).

The cost is memory: a moved matmul's inputs live until the window (an MLP weight gradient at
16K tokens on 2 GPUs: its [S/P, intermediate] input, 128 MiB, held through the attention
backward). A window takes matmuls whose stretched inputs add up to at most ``HELD_BYTES``; at
long sequences the large ones stay where they were and the plan says how many moved. A graph
with nothing moved is left as it was. Every rank makes the same moves (the graph is the same),
so the gradient all-reduces keep one order across the group. Inductor compiles the backward in
this order (the backend turns off its peak-memory reordering for the graph, which would pull
the matmuls back). Switched off by ``disable_passes=("defer_weight_grads",)``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.fx as fx

from autosp._torch_private import collective_wait_op, fake_mode_of, size_hint
from autosp.graph_utils import ancestors, new_node, tensor_bytes, val
from autosp.passes.grad_reduce import tail_to_output

_GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
# Rates for the estimates, the ratio alone matters: bf16 GEMMs at these shapes, ~600 TFLOP/s;
# an all-to-all's output buffer at ~300 GB/s (2x H200, 48 MiB in 0.13-0.16 ms, RESULTS.md 2026-11-29).
GEMM_FLOPS_PER_S = 600e12
COLLECTIVE_BYTES_PER_S = 300e9
COVER = 1.5
HEAD_S = 20e-6  # a window's first matmul is split to start with a head this long (see _split_head)
HEAD_ROWS = 64  # ... a multiple of this many rows
HELD_BYTES = 256 << 20  # the inputs a window may keep alive longer, together


def defer_weight_grads_pass(gm: fx.GraphModule) -> tuple[int, int, int]:
    """Move weight-gradient matmuls into the waits of the backward's collectives; returns
    ``(matmuls moved, windows filled, first matmuls split)``."""
    graph = gm.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    wait_op = collective_wait_op()
    # a wait on what is no collective (a second wait on a gathered tensor's view) is no window
    windows = [(n.args[0], n) for n in graph.nodes
               if n.op == "call_function" and n.target is wait_op and isinstance(n.args[0], fx.Node)
               and _is_collective(n.args[0]) and not _is_gradient_all_reduce(n.args[0], n, output)]
    gemms = [n for n in graph.nodes if n.op == "call_function" and n.target in _GEMMS]
    moved: set[fx.Node] = set()
    filled = split = 0
    # the graph's fake mode for new nodes' values (a graph of real example values: no mode needed)
    fake_mode = fake_mode_of([val(n) for n in graph.nodes if n.op == "placeholder"]) or contextlib.nullcontext()
    for collective, wait in windows:
        order = {n: i for i, n in enumerate(graph.nodes)}
        before = ancestors(collective)  # what the collective waits for: never moved past it
        need = COVER * tensor_bytes(val(collective)) / COLLECTIVE_BYTES_PER_S
        have, held, chosen = 0.0, 0, []
        for mm in sorted((m for m in gemms if m not in moved and m not in before and order[m] < order[collective]),
                         key=order.__getitem__, reverse=True):
            if have >= need:
                break
            stretched = _stretched_bytes(mm, order, order[collective])
            tail = _tail(mm, order, order[collective])
            if held + stretched > HELD_BYTES or _waited_before(tail, order, order[wait]):
                continue
            chosen.append((mm, tail))
            have += _gemm_seconds(mm)
            held += stretched
        cursor, late = collective, wait
        for mm, tail in chosen:  # in the order taken: a later matmul's tail may read an earlier one's
            cursor, late = _move_after(tail, cursor, late, order)
            moved.add(mm)
        if chosen:
            filled += 1
            split += _split_head(collective.next, fake_mode)  # the first moved matmul
    if moved:
        graph.lint()
        gm.recompile()
    return len(moved), filled, split


def _waited_before(tail: set[fx.Node], order: dict, window_wait: int) -> bool:
    """Whether a collective in a matmul's ``tail`` (``_tail``; its gradient's all-reduce, which
    ``_move_after`` puts after the window's wait) is waited for before that wait by a wait that
    does not move with it (one past the collective being filled, sunk to the end before this
    window's wait): moved, the all-reduce would follow its own wait."""
    return any(_is_collective(n) and any(w not in tail and order[w] <= window_wait for w in n.users) for n in tail)


def _tail(mm: fx.Node, order: dict, limit: int) -> set[fx.Node]:
    """``mm`` and every node it leads to that lies at or before ``limit`` in ``order``."""
    tail, frontier = {mm}, [mm]
    while frontier:
        for u in frontier.pop().users:
            if u.op != "output" and u not in tail and order[u] <= limit:
                tail.add(u)
                frontier.append(u)
    return tail


def _is_gradient_all_reduce(collective: fx.Node, wait: fx.Node, output: fx.Node) -> bool:
    """A gradient's all-reduce (``overlap_grad_reduce``): waited for at the graph's end, where it
    goes out; its wait is no window to fill."""
    return collective.target is torch.ops._c10d_functional.all_reduce.default and \
        tail_to_output(wait, output) is not None


def _move_after(tail: set[fx.Node], cursor: fx.Node, late: fx.Node, order: dict) -> tuple[fx.Node, fx.Node]:
    """Put a matmul's ``tail`` (``_tail``: the matmul and every node it leads to that lay before
    the collective, in ``order``, the numbering before this window's moves; none of them is what
    the collective waits for, or the matmul would be too) after ``cursor``, in their order; but a
    collective among them (the gradient's all-reduce) and what follows it after ``late`` (the
    window's wait): NCCL's all-reduce beside the all-to-all slows it (measured on 2x H200 at 16K,
    all-reduces in the windows took the all-to-alls from 1.1x to 2.3x NCCL alone). Returns the
    two cursors after the moves."""
    after_wait: set[fx.Node] = set()
    for n in sorted(tail, key=order.__getitem__):
        if _is_collective(n) or any(x in after_wait for x in n.all_input_nodes):
            after_wait.add(n)
            late.append(n)
            late = n
        else:
            cursor.append(n)
            cursor = n
    return cursor, late


def _is_collective(n: fx.Node) -> bool:
    return n.op == "call_function" and getattr(n.target, "namespace", None) == "_c10d_functional"


def _stretched_bytes(mm: fx.Node, order: dict, new_place: int) -> int:
    """Bytes of ``mm``'s inputs that nothing else reads at or after ``new_place``: what moving it
    there keeps alive longer (a view counts as the value it views: one level)."""
    total = 0
    for x in mm.all_input_nodes:
        base = x.all_input_nodes[0] if _is_view(x) and x.all_input_nodes else x
        readers = set(base.users) | set(x.users)
        if base.op == "placeholder" or any(order[r] >= new_place for r in readers if r is not mm):
            continue  # a graph input (alive anyway), or read later anyway
        total += tensor_bytes(val(base))
    return total


_VIEWS = {torch.ops.aten.t.default, torch.ops.aten.permute.default, torch.ops.aten.view.default,
          torch.ops.aten._unsafe_view.default, torch.ops.aten.transpose.int, torch.ops.aten.reshape.default}


def _is_view(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in _VIEWS


def _gemm_seconds(mm: fx.Node) -> float:
    out = val(mm)
    a = mm.args[1] if mm.target is torch.ops.aten.addmm.default else mm.args[0]
    return 2.0 * math.prod(size_hint(d) for d in out.shape) * size_hint(val(a).shape[-1]) / GEMM_FLOPS_PER_S


def _split_head(mm: fx.Node, fake_mode) -> bool:
    """Split a window's first matmul by output rows into a head of about ``HEAD_S`` and the rest,
    concatenated: ``mm(a, b) -> cat([mm(a[:m], b), mm(a[m:], b)])`` (each output row is the same
    sum over the same inputs). Whether it was split: not an ``mm`` of static rows, or not longer
    than ``4 x HEAD_S``, stays whole."""
    if mm.op != "call_function" or mm.target is not torch.ops.aten.mm.default:
        return False
    a, b = mm.args
    rows, seconds = val(a).shape[0], _gemm_seconds(mm)
    if not isinstance(rows, int) or seconds <= 4 * HEAD_S:
        return False
    head = max(HEAD_ROWS, int(rows * HEAD_S / seconds) // HEAD_ROWS * HEAD_ROWS)
    if head * 2 > rows:
        return False
    graph = mm.graph
    with graph.inserting_before(mm):
        parts = [new_node(graph, torch.ops.aten.mm.default,
                          (new_node(graph, torch.ops.aten.slice.Tensor, (a, 0, lo, hi), like=mm, fake_mode=fake_mode), b),
                          like=mm, fake_mode=fake_mode)
                 for lo, hi in ((0, head), (head, rows))]
        whole = new_node(graph, torch.ops.aten.cat.default, (parts, 0), like=mm, fake_mode=fake_mode)
    mm.replace_all_uses_with(whole)
    graph.erase_node(mm)
    return True
