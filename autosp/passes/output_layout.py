"""output_layout: return sharded values in the layout the user asked for.

``Partial`` outputs (a loss) are all-reduced: every rank returns the one-device value.
``Seq`` outputs (logits, hidden states, KV) follow ``Config.outputs``:

* ``"dtensor"`` (default) and ``"local"``: this rank's shard without its padding; the backend's
  runtime wraps it into a ``DTensor`` sharded on the sequence dim for ``"dtensor"``;
* ``"full"``: all-gathered, padding dropped.

A flattened sequence dim (``[B*S, V]``) cannot be described as one DTensor shard, so it is
gathered; the plan says so.

Before::  return (loss_partial, logits_BLV)
After::   return (all_reduce_sum(loss_partial), unshard_seq(logits_BLV, 1, n_valid))
"""

from __future__ import annotations

import torch.fx as fx

from autosp.graph_utils import global_val
from autosp.layout import FULL, PARTIAL, SEQ, full
from autosp.passes._context import ShardContext, layout_of

OUTPUT_SPECS = "autosp.output_specs"


def output_layout_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Convert each graph output to its returned layout; record what the runtime must wrap."""
    ctx: ShardContext | None = gm.meta.get("autosp.context")
    if ctx is None or not ctx.plan.active:
        return gm
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    returned = out_node.args[0]
    specs = []
    mapping = {}
    for i, n in enumerate(returned if isinstance(returned, (tuple, list)) else [returned]):
        lay = layout_of(n)
        spec, label = None, "unchanged"
        if lay is None or not isinstance(n, fx.Node) or lay.kind == FULL:
            pass
        elif lay.kind == PARTIAL:
            mapping[n] = ctx.convert(n, lay, full(), out_node)
            label = "partial sums all-reduced"
        elif lay.kind == SEQ and (cfg.options.outputs == "full" or lay.outer * lay.inner != 1):
            mapping[n] = ctx.convert(n, lay, full(), out_node)
            label = "gathered to full length" + (" (flattened sequence dim)" if cfg.options.outputs != "full" else "")
        elif lay.kind == SEQ:
            mapping[n] = ctx.trim(n, lay, out_node)
            if cfg.options.outputs == "dtensor":
                spec = ("dtensor", lay.dim, list(global_val(n).shape))
                label = f"DTensor sharded on dim {lay.dim}"
            else:
                label = f"local shard on dim {lay.dim}"
        else:
            raise AssertionError(f"autosp: output {n} has layout {lay}")
        specs.append(spec)
        shape = list(global_val(n).shape) if isinstance(n, fx.Node) and hasattr(global_val(n), "shape") else ""
        ctx.plan.outputs.append(f"output {i} {getattr(n, 'name', n)} {shape}: {label}")
    if mapping:
        out_node.args = fx.node.map_arg(out_node.args, lambda n: mapping.get(n, n))
        gm.graph.lint()
        gm.recompile()
    gm.meta[OUTPUT_SPECS] = specs
    return gm
