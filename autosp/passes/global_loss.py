"""global_loss: make a mean cross-entropy the global token-weighted mean.

A mean over this rank's tokens is not the one-device loss (ranks hold different numbers of
valid tokens). The pass writes the mean as an explicit sum over a count of valid targets,
which is exact on one device; shard_sequence then keeps the sum a per-rank partial sum and the
count whole-sequence integer work, and one all-reduce makes the loss global.

Before::

    loss = cross_entropy(logits_NV, labels_N, ignore_index=-100, reduction="mean")

After::

    total = cross_entropy(logits_NV, labels_N, ignore_index=-100, reduction="sum")
    count = (labels_N != -100).sum()
    loss = total / count
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from autosp.graph_utils import new_node


def global_loss_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Rewrite mean cross-entropy into sum / count of valid targets."""
    ctx = gm.meta.get("autosp.context")
    if ctx is None:
        return gm
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.cross_entropy:
            continue
        names = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
        a = dict(zip(names, node.args, strict=False))
        a.update(node.kwargs)
        if a.get("reduction", "mean") != "mean" or a.get("weight") is not None:
            continue
        if a.get("size_average") is not None or a.get("reduce") is not None:
            continue
        ignore = a.get("ignore_index", -100)
        target = a["target"]
        with gm.graph.inserting_before(node):
            kwargs = {k: v for k, v in a.items() if k not in ("input", "target")}
            kwargs["reduction"] = "sum"
            total = new_node(gm.graph, F.cross_entropy, (a["input"], target), kwargs, like=node, fake_mode=ctx.fake_mode)
            loss = mean_over_valid(gm.graph, total, target, ignore, like=node, fake_mode=ctx.fake_mode)
        node.replace_all_uses_with(loss)
        gm.graph.erase_node(node)
        ctx.plan.note(f"{loss.name}: mean cross-entropy as a global sum over the count of valid targets")
        changed = True
    if changed:
        gm.recompile()
    return gm


def mean_over_valid(graph: fx.Graph, total: fx.Node, target: fx.Node, ignore_index: int, *, like, fake_mode) -> fx.Node:
    """``total / (target != ignore_index).sum()`` at the insertion point: a summed loss made the
    token-weighted mean (used here and by fused_loss)."""
    valid = new_node(graph, torch.ne, (target, ignore_index), like=like, fake_mode=fake_mode)
    count = new_node(graph, torch.sum, (valid,), like=like, fake_mode=fake_mode)
    return new_node(graph, operator.truediv, (total, count), like=like, fake_mode=fake_mode)
