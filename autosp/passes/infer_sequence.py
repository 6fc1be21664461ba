"""infer_sequence: which dimension of which graph input is the sequence.

Analysis only. A data input (a graph input that is not a parameter, i.e. does not require
grad) whose size along some dimension is S (the same int, or the same symbol) carries the
sequence there; ``meta["autosp.seq_dim"]`` records it and the plan says how each input is
treated. Inputs stay ``Full``: the cut to the local shard happens later, where the first
float work on them begins (shard_sequence), so integer work such as label shifting runs on
the whole sequence. When several dimensions have size S (batch == S) the first one after the
batch dimension is taken.

Before / after: the graph is unchanged; ``plan.inputs`` lists, e.g.::

    l_kwargs_input_ids_ [2, 17]: sequence on dim 1
    l_self_modules_..._weight_ [128, 32]: parameter, replicated
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autosp.graph_utils import val
from autosp.passes._context import SEQ_DIM


def infer_sequence_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Record the sequence dimension of every data input."""
    ctx = gm.meta.get("autosp.context")
    if ctx is None:
        return gm
    plan = ctx.plan
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        v = val(node)
        if not isinstance(v, torch.Tensor):
            continue
        if v.requires_grad or isinstance(v, torch.nn.Parameter):  # weights, frozen ones too
            continue
        dims = [i for i, s in enumerate(v.shape) if ctx.is_seq_size(s)]
        if not dims:
            continue
        dim = next((d for d in dims if d >= 1), dims[0]) if v.dim() > 1 else dims[0]
        node.meta[SEQ_DIM] = dim
        plan.inputs.append(f"{node.name} {list(v.shape)} {v.dtype}: sequence on dim {dim}")
    if not plan.inputs:
        plan.note("no graph input carries the sequence: S comes from the model itself")
    return gm
