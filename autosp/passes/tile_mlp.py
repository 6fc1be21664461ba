"""tile_mlp: a layer's MLP runs over sequence tiles, so its wide intermediates exist one tile at a time.

The MLP of a Llama layer makes three ``[B, L, I]`` tensors (gate, up, their product; I = 4D)
from one ``[B, L, D]`` input: at 128K local tokens and I = 8192 that is 2 GiB each, forward
and backward. With ``Config.tile_mlp = k`` the pass splits the MLP's input into ``k`` tiles
along the sequence, runs a copy of the MLP's ops on each and concatenates the outputs. Every
op of an MLP acts on each token alone, so the result is the same values (the weight gradients
are summed over tiles, a different order of additions). With ``recompute`` on, the backward
recomputes one tile at a time too. The same ``k`` on every rank (the local length is the same
on every rank).

Before::

    y_BLD = down(silu(gate(x_BLD)) * up(x_BLD))

After (k = 2)::

    x0_BTD, x1_BTD = tensor_split(x_BLD, 2, dim=-2)
    y_BLD = cat([down(silu(gate(x0_BTD)) * up(x0_BTD)), down(silu(gate(x1_BTD)) * up(x1_BTD))], dim=-2)

A region is the ops of one child module of a repeated layer (``model.layers.3.mlp``) when all
of them are token-wise (linear without mixing tokens, pointwise math, casts), they read one
activation ``[.., L, D]`` besides parameters, one of them is read outside, and some
intermediate is at least twice as wide as the input. Anything else is left as it was.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from autosp._torch_private import fake_mode_of
from autosp.graph_utils import eliminate_dead_code, new_node, refresh_val, val
from autosp.passes.activation_policy import LAYER_PATH

_TOKENWISE_FUNCTIONS = {
    F.linear, torch._C._nn.linear, F.silu, F.gelu, F.relu, torch.sigmoid, torch.tanh, torch.nn.functional.gelu,
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, torch.mul, torch.add, torch.sub,
    torch.pow, operator.pow, torch.rsqrt, torch.exp,
}
_TOKENWISE_METHODS = {"float", "to", "type_as", "mul", "add", "sub", "pow", "sigmoid", "tanh", "neg", "contiguous"}


def tile_mlp_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Split each layer's token-wise MLP region into ``Config.tile_mlp`` sequence tiles."""
    tiles = cfg.options.tile_mlp
    if tiles <= 1:
        return gm
    plan = gm.meta["autosp.plan"]
    fake_mode = fake_mode_of([val(n) for n in gm.graph.nodes if n.op == "placeholder"])
    done = []
    for path, region in _regions(gm).items():
        match = _check(region)
        if match is None:
            continue
        x, out = match
        if val(x).shape[-2] < tiles:
            continue
        _tile(gm, region, x, out, tiles, fake_mode)
        done.append(path)
    if done:
        eliminate_dead_code(gm.graph)
        gm.graph.lint()
        gm.recompile()
        plan.note(f"tile_mlp: {len(done)} MLP regions run over {tiles} sequence tiles ({done[0]}, ...)")
    return gm


def _regions(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Child modules of repeated layers -> their calls, in graph order."""
    out: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        paths = [str(p) for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
        for i, p in enumerate(paths[:-1]):
            if LAYER_PATH.search(p) and not LAYER_PATH.search(paths[i + 1]):
                out.setdefault(paths[i + 1], []).append(node)
                break
    return out


def _is_param(n) -> bool:
    v = val(n)
    return isinstance(n, fx.Node) and n.op in ("placeholder", "get_attr") and isinstance(v, torch.nn.Parameter)


def _check(region: list[fx.Node]):
    """``(x, out)`` if the region is a token-wise MLP worth tiling, else None."""
    inside = set(region)
    for n in region:
        ok = n.target in _TOKENWISE_FUNCTIONS if n.op == "call_function" else n.target in _TOKENWISE_METHODS
        if not ok or not isinstance(val(n), torch.Tensor):
            return None
        if n.target in (F.linear, torch._C._nn.linear):
            if not all(_is_param(a) for a in n.all_input_nodes[1:]):
                return None  # a linear whose weight is an activation would mix tokens
        elif any(_is_param(a) and val(a).dim() > 1 for a in n.all_input_nodes):
            return None  # a parameter with a token dim (a learned [L, D] table) is not per token
    outside_inputs = {a for n in region for a in n.all_input_nodes if a not in inside and not _is_param(a)}
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    if len(outside_inputs) != 1 or len(outputs) != 1:
        return None
    (x,) = outside_inputs
    xv, ov = val(x), val(outputs[0])
    if not isinstance(xv, torch.Tensor) or xv.dim() < 2 or ov.dim() != xv.dim() or ov.shape[:-1] != xv.shape[:-1]:
        return None
    if any(isinstance(val(a), torch.Tensor) and val(a).dim() > 0 and not _is_param(a) and a is not x
           for n in region for a in n.all_input_nodes if a not in inside):
        return None
    if not any(val(n).dim() == xv.dim() and val(n).shape[-1] >= 2 * xv.shape[-1] for n in region):
        return None  # nothing wide: tiling would only add launches
    if any(val(n).dim() != xv.dim() or val(n).shape[:-1] != xv.shape[:-1] for n in region):
        return None  # every value keeps one row per token
    return x, outputs[0]


def _tile(gm: fx.GraphModule, region: list[fx.Node], x: fx.Node, out: fx.Node, tiles: int, fake_mode) -> None:
    graph = gm.graph
    with graph.inserting_before(region[0]):
        split = new_node(graph, torch.tensor_split, (x, tiles), {"dim": -2}, like=region[0], fake_mode=fake_mode)
        parts = [new_node(graph, operator.getitem, (split, i), like=region[0], fake_mode=fake_mode) for i in range(tiles)]
    tile_outs = []
    with graph.inserting_after(out):
        anchor = out
        for part in parts:
            env = {x: part}
            for n in region:
                with graph.inserting_after(anchor):
                    copy = graph.node_copy(n, lambda a, env=env: env.get(a, a))
                refresh_val(copy, fake_mode)
                env[n] = copy
                anchor = copy
            tile_outs.append(env[out])
        with graph.inserting_after(anchor):
            joined = new_node(graph, torch.cat, (tile_outs,), {"dim": -2}, like=out, fake_mode=fake_mode)
    out.replace_all_uses_with(joined)  # the original region is dead code now
