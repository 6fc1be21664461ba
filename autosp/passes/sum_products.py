"""sum_products: a sum of matmul products becomes a chain of ``addmm``, so the products are never
all alive at once.

Runs on the backward graph AOTAutograd's partitioner made (the backend calls it after the
offload and rematerialize passes), when ``Config.recompute`` makes the backward recompute the
layers. A layer's input norm feeds the q, k and v projections, so its gradient is the sum of
three products, one per projection, each ``[S/P, hidden]``::

    gq = mm(dq, Wq); gk = mm(dk, Wk); gv = mm(dv, Wv)
    g = add(add(view(gq), view(gk)), view(gv))          # three products alive, then the sum
    ->
    acc = mm(dq, Wq)
    acc = addmm(acc, dk, Wk)                            # acc + dk @ Wk: one product at a time
    acc = addmm(acc, dv, Wv)
    g = view(acc)

On one H200 at 256K tokens with ``recompute="attention_out"`` the three products held apart were
the step's peak (``benchmarks/memory_breakdown.py``, RESULTS.md 2026-11-29): the chain holds
two such values at most where the sum held three. The MLP's two input products (gate and up) in
each tile are summed the same way.

Which sums: a tree of ``aten.add.Tensor`` nodes (no ``alpha``), each add but the root read only
by the next one, whose leaves are all ``aten.mm`` outputs of one shape and dtype, each read only
through views by its add. The chain runs in the order the products are made. Not bitwise the
same: ``addmm`` adds in the matmul's float32 accumulator and rounds once, where the sum rounded
each product first (in float32 the difference is a few ulps). Switched off by
``disable_passes=("sum_products",)``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autosp.graph_utils import val

_ADD = torch.ops.aten.add.Tensor
_MM = torch.ops.aten.mm.default
_VIEWS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default}


def sum_products_pass(gm: fx.GraphModule) -> int:
    """Rewrite each sum of matmul products into an ``addmm`` chain; returns how many sums."""
    graph = gm.graph
    pos = {n: i for i, n in enumerate(graph.nodes)}
    gone: set[fx.Node] = set()
    done = 0
    for root in reversed(list(graph.nodes)):  # the largest tree first: its inner adds go with it
        if root in gone or not _is_add(root):
            continue
        leaves, dead = _products(root, top=True)
        if leaves is None or len(leaves) < 2 or len(set(leaves)) < len(leaves):
            continue  # no sum of products, or a product added to itself
        mms = sorted(leaves, key=pos.get)
        if len({(tuple(val(m).shape), val(m).dtype) for m in mms}) != 1:
            continue
        acc = mms[0]
        for mm in mms[1:]:
            with graph.inserting_after(mm):
                step = graph.call_function(torch.ops.aten.addmm.default, (acc, *mm.args))
            step.meta["val"] = val(mm)
            acc = step
        with graph.inserting_before(root):
            out = graph.call_function(torch.ops.aten.view.default, (acc, list(val(root).shape)))
        out.meta["val"] = val(root)
        root.replace_all_uses_with(out)
        for n in sorted(dead + mms[1:], key=pos.get, reverse=True):  # adds, the leaves' views, mms
            graph.erase_node(n)
        gone.update(dead)
        done += 1
    if done:
        graph.lint()
        gm.recompile()
    return done


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is _ADD and len(node.args) == 2 and not node.kwargs
            and all(isinstance(a, fx.Node) and isinstance(val(a), torch.Tensor) for a in node.args))


def _products(node: fx.Node, top: bool = False) -> tuple[list[fx.Node] | None, list[fx.Node]]:
    """The mm leaves of the add tree under ``node``, and the nodes that die with the rewrite (its
    adds, the views between them and the leaves); (None, []) if a leaf is not an mm read only
    through views by the tree."""
    if _is_add(node) and (top or len(node.users) == 1):
        leaves, dead = [], [node]
        for a in node.args:
            sub, sub_dead = _products(a)
            if sub is None:
                return None, []
            leaves += sub
            dead += sub_dead
        return leaves, dead
    views = []
    while node.op == "call_function" and node.target in _VIEWS and len(node.users) == 1:
        views.append(node)
        node = node.args[0]
    if node.op == "call_function" and node.target is _MM and len(node.users) == 1:
        return [node], views
    return None, []
