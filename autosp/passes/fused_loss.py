"""fused_loss: ``cross_entropy(linear(h, W))`` becomes one chunked op; the logits never exist.

At 32K local tokens and a 128K vocabulary the logits are 8 GiB in bf16, their float32 copy
16 GiB and its gradient 16 GiB more: the largest tensors of a long-sequence step. This pass
finds a cross-entropy whose input is a linear layer's output seen through row-preserving ops
(``.float()``, a flatten to ``[N, V]``, autosp's trim of padded rows) and calls
``autosp.kernels.linear_cross_entropy`` on ``h`` instead, replaying the same row ops on ``h``.
The loss and the gradients of ``h`` and ``W`` are those of the original (the op computes them
chunk by chunk in the forward; the backward scales them). Works on any group size, after the
sequence-parallel passes (it sees this rank's rows; the loss stays a partial sum).

Before::

    logits_BLV = linear(h_BLD, W_VD)
    loss = cross_entropy(unshard_seq(logits_BLV.float().view(-1, V), 0, ...), t_N, reduction="sum")

After::

    loss = linear_cross_entropy_loss(unshard_seq(h_BLD.reshape(-1, D), 0, ...), W_VD, t_N, -100, C, True)

When the model also returns the logits (Hugging Face models do), ``Config.logits`` says what
happens to that output: ``"keep"`` (default) computes them as before and the plan says what
they cost; ``"detach"`` returns them without gradient (no backward through the lm_head for
them); ``"drop"`` returns an empty tensor in their place, so they are never computed.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from autosp import collectives
from autosp._torch_private import fake_mode_of
from autosp.graph_utils import eliminate_dead_code, new_node, tensor_bytes, val, written_in_place
from autosp.kernels.linear_cross_entropy import default_chunk, linear_cross_entropy_loss
from autosp.passes.global_loss import mean_over_valid
from autosp.passes.output_layout import OUTPUT_SPECS

_LINEAR = (F.linear, torch._C._nn.linear)
_CE_ARGS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")


def fused_loss_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Replace every matching linear + cross-entropy by the chunked fused op."""
    opts = cfg.options
    if not opts.fused_loss:
        return gm
    plan = gm.meta["autosp.plan"]
    fake_mode = fake_mode_of([val(n) for n in gm.graph.nodes if n.op == "placeholder"])
    fused_linears, created = [], False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.cross_entropy:
            continue
        match = _match(node)
        if match is None:
            continue
        linear, h, w, chain, upcast, a = match
        D, V = val(w).shape[1], val(w).shape[0]
        chunk = opts.loss_chunk or default_chunk(V)
        with gm.graph.inserting_before(node):
            rows = h
            for op in chain:
                if op == "flatten":
                    rows = new_node(gm.graph, torch.reshape, (rows, (-1, D)), like=node, fake_mode=fake_mode)
                else:
                    rows = new_node(gm.graph, op.target, (rows, *op.args[1:]), dict(op.kwargs), like=op, fake_mode=fake_mode)
            if val(rows).dim() != 2:
                created = True
                continue
            ignore = a.get("ignore_index", -100)
            loss = new_node(gm.graph, linear_cross_entropy_loss, (rows, w, a["target"], ignore, chunk, upcast),
                            like=node, fake_mode=fake_mode)
            if val(loss).dtype != val(node).dtype:
                loss = new_node(gm.graph, torch.Tensor.to, (loss, val(node).dtype), like=node, fake_mode=fake_mode)
            if a.get("reduction", "mean") == "mean":
                loss = mean_over_valid(gm.graph, loss, a["target"], ignore, like=node, fake_mode=fake_mode)
        node.replace_all_uses_with(loss)
        gm.graph.erase_node(node)
        fused_linears.append(linear)
        logits_bytes = tensor_bytes(val(linear))
        plan.note(f"{node.name}: linear + cross-entropy fused over chunks of {chunk} rows (the [N, {V}] "
                  f"logits of {linear.name} are never built for the loss)")
        _logits_output(gm, linear, opts.logits, plan, logits_bytes, fake_mode)
    if fused_linears or created:
        eliminate_dead_code(gm.graph)
        gm.graph.lint()
        gm.recompile()
    return gm


def _match(ce: fx.Node):
    """``(linear, h, W, row ops from the logits to the loss input, upcast, CE args)`` or None."""
    a = dict(zip(_CE_ARGS, ce.args, strict=False))
    a.update(ce.kwargs)
    if a.get("weight") is not None or a.get("label_smoothing", 0.0) or a.get("size_average") is not None \
            or a.get("reduce") is not None or a.get("reduction", "mean") not in ("sum", "mean"):
        return None
    x, chain, walked, upcast = a["input"], [], [], False
    if not isinstance(x, fx.Node) or val(x).dim() != 2 or val(a["target"]).dim() != 1:
        return None
    while isinstance(x, fx.Node) and not (x.op == "call_function" and x.target in _LINEAR):
        src = x.args[0] if x.args else None
        if not isinstance(src, fx.Node) or not isinstance(val(src), torch.Tensor):
            return None
        v, s = val(x), val(src)
        if x.op == "call_method" and x.target in ("float", "to") and v.dtype == torch.float32 and v.shape == s.shape:
            if x.target == "to" and (len(x.args) != 2 or x.kwargs):
                return None
            upcast = True
        elif x.op == "call_method" and x.target == "contiguous":
            pass
        elif (x.op == "call_method" and x.target in ("view", "reshape")) or x.target is torch.reshape:
            if v.dim() != 2 or v.shape[-1] != s.shape[-1]:
                return None
            chain.insert(0, "flatten")
        elif x.target is collectives.unshard_seq and x.args[1] == 0 and v.dim() == 2:
            chain.insert(0, x)
        else:
            return None
        walked.append(x)
        x = src
    if not isinstance(x, fx.Node):
        return None
    la = dict(zip(("input", "weight", "bias"), x.args, strict=False))
    la.update(x.kwargs)
    if any(written_in_place(n) for n in (x, *walked, la["input"], la["weight"]) if isinstance(n, fx.Node)):
        return None  # something writes the logits, h or W in place: recomputing from h and W would miss it
    if la.get("bias") is not None or val(la["weight"]).dim() != 2:
        return None
    return x, la["input"], la["weight"], chain, upcast, a


def _logits_output(gm, linear: fx.Node, mode: str, plan, logits_bytes: int, fake_mode) -> None:
    """Apply ``Config.logits`` to graph outputs computed from ``linear`` (the logits)."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    returned = out_node.args[0]
    flat = list(returned) if isinstance(returned, (tuple, list)) else [returned]
    specs = gm.meta.get(OUTPUT_SPECS)
    for i, n in enumerate(flat):
        if not _comes_from(n, linear):
            continue
        gib = logits_bytes / 2**30
        if mode == "keep":
            plan.note(f"output {i} ({n.name}) returns the logits: {gib:.2f} GiB per rank kept for it, and its "
                      f"backward through the lm_head; Config(logits='detach' or 'drop') avoids that")
            continue
        with gm.graph.inserting_before(out_node):
            if mode == "detach":
                new = new_node(gm.graph, "detach", (n,), op="call_method", like=n, fake_mode=fake_mode)
                plan.note(f"output {i} ({n.name}): logits returned without gradient (Config.logits='detach')")
            else:
                w = linear.args[1]
                new = new_node(gm.graph, "new_empty", (w, (0,)), op="call_method", like=n, fake_mode=fake_mode)
                plan.note(f"output {i} ({n.name}): logits not computed, an empty tensor returned "
                          f"(Config.logits='drop'; saves {gib:.2f} GiB per rank)")
                if specs is not None and i < len(specs):
                    specs[i] = None
        flat[i] = new
        if i < len(plan.outputs) and plan.outputs[i].startswith(f"output {i} "):
            plan.outputs[i] = plan.outputs[i].split(":")[0] + f": logits {'detached' if mode == 'detach' else 'dropped'}"
    out_node.args = (type(returned)(flat) if isinstance(returned, (tuple, list)) else flat[0],)


_SAME_VALUES = {"view", "reshape", "float", "to", "contiguous"}


def _comes_from(n, linear: fx.Node) -> bool:
    """Whether ``n`` is ``linear``'s output itself, seen through views, casts and autosp's
    trims and gathers (not a value computed from it, such as an argmax)."""
    while isinstance(n, fx.Node):
        if n is linear:
            return True
        same = (n.op == "call_method" and n.target in _SAME_VALUES) or n.target in (
            collectives.unshard_seq, collectives.gather_seq)
        if not same or not n.args or not isinstance(n.args[0], fx.Node):
            return False
        n = n.args[0]
    return False
