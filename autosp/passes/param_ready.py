"""param_ready: each parameter waits, right before its first reader, for a collective in flight into it.

``autosp.ShardedOptimizer(gather_in_forward=True)`` ends its step with the all-gathers of the
updated parameters still running (one a block of parameters, in the order the forward reads
them), so that the next forward, not the optimizer step, waits for them, and each layer only for
its own block: the gathers of the last layers run while the first ones compute. The wait is
torch's ``wait_tensor`` on the parameter (the functional collectives' work registry, keyed by
storage; the optimizer registers each block's work); with nothing in flight it returns at once::

    p = placeholder                               # a parameter
    p_mean = collectives.mean_grad(p, "g", 2)     # grad_reduce: a view; moved down with p's uses
    ...
    y = linear(x, p_mean)                         # p's first reader
    ->
    p = placeholder
    ...
    p_ready = collectives.param_ready(p)          # wait_tensor(p); backward: identity
    p_mean = collectives.mean_grad(p_ready, "g", 2)
    y = linear(x, p_mean)

It runs after grad_reduce (whose ``mean_grad`` reads no data: the wait goes before the first
node that reads through it) and only with more than one rank (the optimizer it serves splits
the step over the group).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autosp import collectives
from autosp._torch_private import fake_mode_of
from autosp.graph_utils import new_node, val

# identity views of a parameter that read no data: the wait goes before their readers
_PASS_THROUGH = (collectives.mean_grad,)


def param_ready_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Insert ``collectives.param_ready`` before each parameter's first reader."""
    if cfg.world == 1:
        return gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = [n for n, x in zip(placeholders, example_inputs, strict=False)
              if isinstance(x, torch.nn.Parameter) and n.users]
    if not params:
        return gm
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    fake_mode = fake_mode_of([val(n) for n in placeholders])
    for p in params:
        through = [u for u in p.users if u.op == "call_function" and u.target in _PASS_THROUGH]
        readers = [u for u in p.users if u not in through] + [r for t in through for r in t.users]
        if not readers:
            continue
        first = min(readers, key=order.__getitem__)
        with gm.graph.inserting_before(first):
            ready = new_node(gm.graph, collectives.param_ready, (p,), like=None, fake_mode=fake_mode,
                             name_hint=f"{p.name}_ready")
        for u in list(p.users):
            if u is not ready:
                u.replace_input_with(p, ready)
        for t in through:  # after the wait, before their readers (each is after ``first``)
            first.prepend(t)
    gm.graph.lint()
    gm.recompile()
    plan = gm.meta.get("autosp.plan")
    if plan is not None:
        plan.note(f"param_ready: {len(params)} parameters wait for a collective in flight into them (an all-gather "
                  "of autosp.ShardedOptimizer(gather_in_forward=True)) right before their first reader")
    return gm
