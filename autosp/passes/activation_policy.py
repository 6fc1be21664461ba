"""activation_policy: what each repeated layer keeps for the backward, and what it recomputes.

Long sequences run out of memory on the activations the forward keeps for the backward: per
token and layer, a Llama layer keeps about 20 values of the hidden size (the MLP's
intermediates are four times as wide). With ``Config.recompute="selective"`` every op inside a
repeated layer (a module whose path ends in an index, ``model.layers.7``) is marked to be
recomputed in the backward, except

* attention (SDPA): the most expensive op to recompute, quadratic in the sequence; its output
  and log-sum-exp are kept, and so are its inputs;
* collectives (autosp's all-to-alls and gathers): never run twice;

so a layer keeps its input, attention's inputs and output, and the all-to-all results; the
norms, projections, rotary embedding and MLP are recomputed from them. ``"full"`` marks every
op of the layer, attention and its all-to-alls included: a layer keeps its input alone, as
hand-written checkpointing (ALST) does, and the backward runs the layer's forward again
(attention and the all-to-alls twice). In both, a value that leaves its layer (the layer's
output) is kept: the partitioner keeps what passes from one marked layer to the next on its
own, but the last layer's output feeds unmarked ops (the final norm), and recomputing it would
rerun that layer's whole forward before its backward starts, every MLP tile of it alive at
once (measured: 4 layers at 256K tokens on one H100 peaked at 33 GiB, twice the 128K peak).
``"blocks"`` is ``"full"`` with one more value kept per layer, the attention block's output
(``h = x + attn(x)``, found as the last value after the layer's attention that is then the only
one of the layer still to be read): the MLP block's backward needs ``h`` alone, so the backward
recomputes and differentiates the MLP block first and recomputes attention only when attention's
own backward comes; with ``"full"`` the MLP's input depends on attention, so the whole layer is
recomputed up front and attention's values stay alive through the MLP's backward. The cost is
one more ``[S/P, hidden]`` value per layer (host memory, with ``Config.offload``).
``"attention_out"`` keeps, besides a layer's input, attention's own outputs (its output and
log-sum-exp, what its backward reads) and recomputes everything else, attention's inputs and the
all-to-alls included: the backward never runs attention's forward again, which is about 2/9 of
attention's FLOPs that ``"full"`` and ``"blocks"`` (and ALST) pay, the most expensive part of a
long-sequence step. It costs what ``"blocks"`` costs, one ``[S/P, hidden]`` value per layer more
than ``"full"`` (attention's output where ``"blocks"`` keeps ``h``), and it splits the backward the
same way: the MLP block's recomputation needs ``h = x + o_proj(out)``, one matmul from the two
kept values, and attention's inputs are recomputed only when attention's backward comes.
``"auto"`` lets the planner choose, value by value, what each layer keeps under
``Config.memory_budget_gb`` (a minimum cut per layer, and host offload when it pays:
autosp/passes/memory_plan.py); the plan gives its estimate and a memory timeline.

The marks are the ones torch's own selective checkpointing uses (``meta["recompute"]`` with a
``CheckpointPolicy`` and ``meta["ac_graph_id"]`` per layer), which AOTAutograd copies onto the
joint graph; its min-cut partitioner then never saves a marked op's output and saves the
outputs that cross from one layer to the next.

Before / after: the graph's code is unchanged; the nodes carry the marks, and the plan lists
per layer what is kept.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from autosp import collectives
from autosp.graph_utils import live_bytes, tensor_bytes
from autosp.passes import memory_plan
from autosp.passes._attention import is_attention_call

LAYER_PATH = re.compile(r"\.\d+$")  # a repeated layer: a module path ending in an index


def activation_policy_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Mark the ops of each repeated layer as saved or recomputed (``Config.recompute``)."""
    from torch.utils.checkpoint import CheckpointPolicy

    mode = cfg.options.recompute
    if mode == "none":
        return gm
    plan = gm.meta["autosp.plan"]
    layers = layer_of_nodes(gm)
    if not layers:
        plan.note(f"recompute={mode!r}: no repeated layers found (no module path ends in an index); nothing marked")
        return gm
    if mode == "auto":
        return _planned(gm, example_inputs, cfg, layers)
    kept_ops = 0
    cuts = block_cuts(layers) if mode == "blocks" else set()
    for node, layer in layers.items():
        attention = is_attention_call(node)
        keep = (mode == "selective" and (attention or collectives.is_collective(node.target))
                or mode == "attention_out" and attention or node in cuts)
        # A layer's output is kept: the partitioner keeps what crosses from one marked layer to
        # the next, but the last layer's output feeds unmarked ops (the final norm), and
        # recomputing it would rerun the whole layer before the backward reaches it.
        leaves = _leaves_layer(node, layer, layers)
        node.meta["recompute"] = CheckpointPolicy.MUST_SAVE if keep or leaves else CheckpointPolicy.PREFER_RECOMPUTE
        node.meta["ac_graph_id"] = layer
        kept_ops += keep
    n_layers = len(set(layers.values()))
    if mode == "full":
        plan.note(f"recompute='full': {n_layers} layers; each keeps its input alone and recomputes everything, "
                  f"attention and its all-to-alls included (ALST's checkpointing)")
    elif mode == "blocks":
        plan.note(f"recompute='blocks': {n_layers} layers; each keeps its input and its attention block's output "
                  f"({', '.join(sorted(n.name for n in cuts)[:4])}{', ...' if len(cuts) > 4 else ''}; "
                  f"{n_layers - len(cuts)} layers without one keep their input alone) and recomputes the rest")
    elif mode == "attention_out":
        plan.note(f"recompute='attention_out': {n_layers} layers; each keeps its input and attention's outputs "
                  f"({kept_ops // n_layers} attention calls a layer) and recomputes the rest, attention's inputs "
                  f"and the all-to-alls included, never attention itself")
    else:
        plan.note(f"recompute='selective': {n_layers} layers; in each, attention and collectives are kept "
                  f"({kept_ops // n_layers} ops a layer), every other op is recomputed in the backward")
    return gm


def _leaves_layer(node: fx.Node, layer: int, layers: dict[fx.Node, int]) -> bool:
    """Whether ``node``'s value is read outside its layer (the graph's own outputs aside)."""
    return any(layers.get(u) != layer for u in node.users if u.op != "output")


def block_cuts(layers: dict[fx.Node, int]) -> set[fx.Node]:
    """Per layer, the value between its attention block and what follows (the residual stream
    ``h = x + attn(x)`` of a pre-norm layer): the last node after the layer's last attention that
    is, once made, the only value of the layer still to be read (the layer's input comes from
    outside), the layer's output excluded. Kept, it splits the layer's backward in two: the
    recomputation of the MLP block needs it alone, and attention is recomputed only when its own
    backward comes, so the two blocks' recomputed values are never alive together."""
    by_layer: dict[int, list[fx.Node]] = {}
    for node, layer in layers.items():
        by_layer.setdefault(layer, []).append(node)
    cuts = set()
    for layer, nodes in by_layer.items():
        attention = [i for i, n in enumerate(nodes) if is_attention_call(n)]
        if not attention:
            continue
        position = {n: i for i, n in enumerate(nodes)}
        # Read later: by the layer's later ops or from outside (the next layer); a value the graph
        # returns (a KV cache) is alive anyway, and does not decide what the backward needs.
        last_read = {n: max((position.get(u, len(nodes)) for u in n.users if u.op != "output"), default=-1)
                     for n in nodes}
        candidate, read_until = None, -1  # read_until: the last read of any value made before node i
        for i, n in enumerate(nodes):
            leaves = _leaves_layer(n, layer, layers)
            if (i > attention[-1] and not leaves and isinstance(n.meta.get("val"), torch.Tensor)
                    and read_until <= i < last_read[n]):
                candidate = n
            read_until = max(read_until, last_read[n])
        if candidate is not None:
            cuts.add(candidate)
    return cuts


def _planned(gm: fx.GraphModule, example_inputs, cfg, layers: dict[fx.Node, int]) -> fx.GraphModule:
    """``recompute="auto"``: the planner's choice, as marks; a planned offload turns the offload
    passes on for the region (``plan.memory["offload"]``)."""
    from torch.utils.checkpoint import CheckpointPolicy

    plan = gm.meta["autosp.plan"]
    opts = cfg.options
    device = _device_bytes(example_inputs)
    if opts.memory_budget_gb is not None:
        budget = int(opts.memory_budget_gb * 2**30)
    elif device is not None:
        budget = int(device * (1 - memory_plan.MARGIN))
    else:
        budget = 2**62  # no accelerator and no budget: nothing to fit
    params = sum(tensor_bytes(x) for x in example_inputs if isinstance(x, torch.nn.Parameter))
    chosen = memory_plan.plan_layers(layers, params, budget, allow_offload=opts.compiler != "eager",
                                     host_budget=memory_plan.host_budget(opts.host_memory_gb, opts.host_processes),
                                     keep_layers=opts.offload_keep_layers)
    kept = set().union(*(p.kept for p in chosen.layers.values()))
    for node, layer in layers.items():
        node.meta["recompute"] = CheckpointPolicy.MUST_SAVE if node in kept else CheckpointPolicy.PREFER_RECOMPUTE
        node.meta["ac_graph_id"] = layer
    plan.note(f"recompute='auto': {chosen.summary()}; per layer {len(kept) // len(chosen.layers)} values kept "
              f"of {len(layers) // len(chosen.layers)}")
    plan.memory = {"budget": budget, "predicted_peak": chosen.predicted_peak, "offload": chosen.offload,
                   "timeline": _sampled(live_bytes(gm.graph)), "fits": chosen.fits}
    return gm


def _sampled(values: list[int], points: int = 400) -> list[int]:
    """At most ``points`` values, each the largest of its stretch (peaks survive)."""
    step = max(1, -(-len(values) // points))
    return [max(values[i:i + step]) for i in range(0, len(values), step)]


def layer_of_nodes(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Each call inside a repeated layer -> the layer's index (in the order layers first appear)."""
    index: dict[str, int] = {}
    out = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = next((p for p, _ in stack.values() if LAYER_PATH.search(str(p))), None)
        if path is not None:
            out[node] = index.setdefault(path, len(index))
    return out


def _device_bytes(example_inputs) -> int | None:
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.device.type == "cuda":
            return torch.cuda.get_device_properties(x.device).total_memory
    return None
