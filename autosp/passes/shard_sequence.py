"""shard_sequence: run every op on this rank's shard of the sequence.

One sweep in graph order gives each value a layout (``autosp.layout``) by the op's rule
(``_rules.RULES``), converts inputs where a rule needs another layout (a local cut of a full
input, an all-gather where an op has no rule, an all-reduce of a partial sum), rewrites shape
arguments that hold the global length, and rewrites self-attention into the all-to-all form
(``_attention``). Every node it creates or changes gets a correct ``meta["val"]``.

Before (one device)::

    h_BSD = embedding(ids_BS, w_VD)
    q_BNSH = linear(h_BSD, wq).view(B, S, N, H).transpose(1, 2)
    o_BNSH = sdpa(q_BNSH, k_BNSH, v_BNSH, is_causal=True)

After (rank r of P)::

    ids_BL = shard_seq(ids_BS, r, P, 1, S, ...)        # integer work before this stays Full
    h_BLD = embedding(ids_BL, w_VD)
    q_BNLH = linear(h_BLD, wq).view(B, -1, N, H).transpose(1, 2)
    o_BNLH = head_to_seq(sdpa(seq_to_head(q_BNLH), ...))
"""

from __future__ import annotations

import operator

import torch.fx as fx

from autosp.graph_utils import (
    SIDE_EFFECT_TARGETS,
    eliminate_dead_code,
    global_val,
    new_node,
    refresh_val,
    val,
    written_inputs,
)
from autosp.layout import FULL, full
from autosp.passes._attention import SDPA_TARGETS, attention_needs, rewrite_attention
from autosp.passes._context import GLOBAL_VAL, LAYOUT, SEQ_DIM, SITE, ShardContext, is_sharded, layout_of
from autosp.passes._rule_base import Decision, fallback
from autosp.passes._rules import RULES


def shard_sequence_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Give every value a layout and make the graph compute on sequence shards."""
    ctx: ShardContext | None = gm.meta.get("autosp.context")
    if ctx is None or not ctx.plan.active:
        return gm
    for node in list(gm.graph.nodes):
        if node.op != "output" and LAYOUT not in node.meta:
            node.meta[GLOBAL_VAL] = val(node)
    ctx.visit = lambda node: _sweep(node, ctx)
    for node in list(gm.graph.nodes):
        _sweep(node, ctx)
    eliminate_dead_code(gm.graph)  # e.g. the model's KV repeat, now done after the all-to-all
    gm.graph.lint()
    gm.recompile()
    return gm


def _sweep(node: fx.Node, ctx: ShardContext) -> None:
    """Give ``node`` its layout (its inputs first, where a rule asks for a node ahead of the sweep)."""
    if LAYOUT in node.meta or node.op == "output":
        return
    if node.op in ("placeholder", "get_attr"):
        node.meta[LAYOUT] = full(node.meta.get(SEQ_DIM))
        return
    for inp in node.all_input_nodes:
        _sweep(inp, ctx)
    if node.target in SIDE_EFFECT_TARGETS or (val(node) is None and node.target is not operator.setitem):
        node.meta[LAYOUT] = full()
        return
    _visit(node, ctx)


def _rule_for(node: fx.Node):
    key = node.target
    try:
        return RULES.get(key)
    except TypeError:  # unhashable target
        return None


def _visit(node: fx.Node, ctx: ShardContext) -> None:
    site = node.meta.get(SITE)
    decision = ctx.decided.pop(node, None)
    if decision is None and node.target in SDPA_TARGETS and site is not None and site["rewrite"]:
        decision = attention_needs(node, ctx)
        if decision.fallback is None:
            _convert_inputs(node, decision, ctx)
            out = rewrite_attention(node, ctx)
            first = _first_user(node, out)
            node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not first)
            node.meta[LAYOUT] = layout_of(out)
            out.meta[GLOBAL_VAL] = global_val(node)
            return
    if decision is None:
        rule = _rule_for(node)
        if rule is not None:
            decision = rule(node, ctx)
        else:  # whole inputs need no gather, so only a sharded input makes this a fallback
            sharded = any(is_sharded(layout_of(n)) for n in node.all_input_nodes)
            decision = fallback(node, ctx, "no layout rule for this op" if sharded else "")
    written = written_inputs(node)
    if any(layout_of(t).kind == FULL and decision.need.get(t, (full(),))[0].kind != FULL for t in written):
        # a rule would cut the whole value the op writes into (acc.add_(x) with x sharded): the
        # write would land in the cut copy; run it on whole values, into the value itself
        decision = fallback(node, ctx, "writes a sharded value into a whole one in place")
    if decision.fallback:
        ctx.fallback(node, decision.fallback)
    if decision.args is not None or decision.kwargs is not None:
        node.args = decision.args if decision.args is not None else node.args
        node.kwargs = decision.kwargs if decision.kwargs is not None else node.kwargs
    given = _convert_inputs(node, decision, ctx)
    for target in written:
        ctx.forget(target)  # a copy made before this write is stale after it
        whole = given.get(target, target)
        if whole is not target and is_sharded(layout_of(target)) and layout_of(whole).kind == FULL:
            _write_back(node, target, whole, ctx)  # it wrote into a whole copy: this rank's shard back
    if decision.replace is not None:
        target, args = decision.replace
        with ctx.graph.inserting_before(node):
            new = new_node(ctx.graph, target, args, like=node, fake_mode=ctx.fake_mode)
        new.meta[LAYOUT] = full()
        new.meta[GLOBAL_VAL] = global_val(node)
        node.replace_all_uses_with(new)
        ctx.graph.erase_node(node)
        return
    refresh_val(node, ctx.fake_mode)
    node.meta[LAYOUT] = decision.out


def _write_back(node: fx.Node, target: fx.Node, whole: fx.Node, ctx: ShardContext) -> None:
    """``node`` writes into the sharded ``target`` and was given ``whole``, its gathered copy (a
    fallback: ``scatter_``, ``x[i] = v``): it writes into a clone of that copy instead (a gather's
    output is the view of an autograd function, not to be written in place), and this rank's shard
    of the clone is copied into ``target`` after it, so that later readers of ``target`` see the
    write."""
    with ctx.graph.inserting_before(node):
        written = new_node(ctx.graph, "clone", (whole,), like=node, fake_mode=ctx.fake_mode, op="call_method")
    written.meta[LAYOUT] = full()
    written.meta[GLOBAL_VAL] = global_val(target)
    node.args = fx.node.map_arg(node.args, lambda n: written if n is whole else n)
    node.kwargs = fx.node.map_arg(node.kwargs, lambda n: written if n is whole else n)
    after = node.next
    local = ctx.convert(written, full(), layout_of(target), after)
    with ctx.graph.inserting_before(after):
        back = new_node(ctx.graph, "copy_", (target, local), like=node, fake_mode=ctx.fake_mode, op="call_method")
    back.meta[LAYOUT] = layout_of(target)
    back.meta[GLOBAL_VAL] = global_val(target)


def _first_user(node: fx.Node, out: fx.Node) -> fx.Node:
    """The node of the head -> sequence all-to-all chain that reads the attention output directly."""
    cur = out
    while cur.args and cur.args[0] is not node:
        cur = cur.args[0]
    return cur


def _convert_inputs(node: fx.Node, decision: Decision, ctx: ShardContext) -> dict:
    """Convert the inputs the decision needs in other layouts (or trimmed); returns each converted
    input's replacement."""
    mapping = {}
    for inp, (want, pad_value) in decision.need.items():
        have = layout_of(inp)
        mapping[inp] = ctx.convert(inp, have, want, node, pad_value)
    for inp in decision.trim:
        src = mapping.get(inp, inp)
        mapping[inp] = ctx.trim(src, layout_of(src), node)
    if mapping:
        node.args = fx.node.map_arg(node.args, lambda n: mapping.get(n, n))
        node.kwargs = fx.node.map_arg(node.kwargs, lambda n: mapping.get(n, n))
    return mapping
