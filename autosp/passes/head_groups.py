"""head_groups: each self-attention runs as several SDPA calls, one per group of heads.

Attention is independent across heads, so with ``Config.attention_head_groups = G > 1`` every
self-attention SDPA call becomes G calls over consecutive head groups (each with its query
heads and the key/value heads they read), and their outputs are concatenated::

    o = sdpa(q_BNSH, k_BnSH, v_BnSH, is_causal=True, enable_gqa=True)
    ->
    o_0 = sdpa(narrow(q, 1, 0, N/G), narrow(k, 1, 0, n/G), narrow(v, 1, 0, n/G), is_causal=True, enable_gqa=True)
    ...
    o = cat([o_0, ..., o_G-1], 1)

Why: what the attention kernels allocate for their backward grows with the heads of one call.
At 256K tokens, 32 query and 8 key/value heads of 64, cuDNN's backward held 5.53 GiB (one
H200, torch 2.11, ``benchmarks/memory_breakdown.py``): dq, dk and dv (1.5 GiB) and 4 GiB of
float32 accumulators. That was the largest single holder at the step's peak, larger than any
activation. With G calls the accumulators of one call exist at a time (a G-th of them); the
cost is a concatenation of the outputs in the forward and of dq, dk, dv in the backward (one
pass over them each, where the kernel's accumulators cost one float32 copy per head).

``"auto"`` picks, per call, the fewest groups (dividing the KV heads) whose accumulators fit in
``AUTO_GROUP_BYTES`` (1 GiB) by the estimate of 8 bytes per element of q measured above. At
this shape that is one call up to 64K tokens on one GPU and 4 groups at 256K. At SP=2 a GPU
has half the heads over the whole sequence: one call up to 128K tokens, 4 groups at 512K.

Exact: the same kernel computes every head, so the groups' results are those of the one call.
G must divide the key/value heads the call sees (after the all-to-all of sequence
parallelism: the local heads), so that each group's query heads read only its own KV heads;
a call it does not divide, or with dropout (its random stream would change) or a mask with
a head dimension, is left as it was, with a line in the plan. Runs before ``chunk_attention``
(the group calls are SDPA calls it can chunk in turn) and on any group size.
"""

from __future__ import annotations

import collections

import torch
import torch.fx as fx

from autosp._torch_private import fake_mode_of
from autosp.graph_utils import new_node, val
from autosp.passes._attention import sdpa_args, self_attention_calls
from autosp.passes._context import SITE

# What the backward kernel holds beside dq, dk, dv, per element of q: cuDNN held 4 GiB for
# q [1, 32, 262144, 64] (one H200, torch 2.11, benchmarks/memory_breakdown.py, 2026-11-29).
ACCUMULATOR_BYTES_PER_Q = 8
AUTO_GROUP_BYTES = 1 << 30  # "auto": the fewest groups whose accumulators fit in this


def head_groups_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Split each self-attention SDPA call into ``Config.attention_head_groups`` head groups."""
    option = cfg.options.attention_head_groups
    if option == 1:
        return gm
    plan = gm.meta["autosp.plan"]
    fake_mode = fake_mode_of([val(n) for n in gm.graph.nodes if n.op == "placeholder"])
    done, why_not = collections.Counter(), {}
    for node in self_attention_calls(gm.graph):
        a = sdpa_args(node)
        q, k, v = a["query"], a["key"], a["value"]
        groups = option if option != "auto" else auto_groups(val(q), val(k))
        if groups == 1:
            continue
        why = cannot_split(node, groups)
        if why:
            why_not[node.name] = why
            continue
        nq, nkv = val(q).shape[1], val(k).shape[1]
        outs = []
        with gm.graph.inserting_before(node):
            for g in range(groups):
                args, kwargs = list(node.args), dict(node.kwargs)
                for i, (name, x, n) in enumerate((("query", q, nq), ("key", k, nkv), ("value", v, nkv))):
                    part = new_node(gm.graph, torch.narrow, (x, 1, g * n // groups, n // groups), like=node,
                                    fake_mode=fake_mode)
                    if len(args) > i:
                        args[i] = part
                    else:
                        kwargs[name] = part
                call = new_node(gm.graph, node.target, tuple(args), kwargs, like=node, fake_mode=fake_mode)
                call.meta[SITE] = node.meta[SITE]
                outs.append(call)
            out = new_node(gm.graph, torch.cat, (outs, 1), like=node, fake_mode=fake_mode)
        out.meta.update({key: value for key, value in node.meta.items() if key not in out.meta and key != SITE})
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        done[(groups, nq // groups, nkv // groups)] += 1
    for name, why in why_not.items():
        plan.note(f"head_groups: {name} left as one call: {why}")
    if done:
        gm.graph.lint()
        gm.recompile()
    for (groups, nq, nkv), count in sorted(done.items()):
        plan.note(f"head_groups: {count} attention calls each run as {groups} calls over {nq} query "
                  f"and {nkv} key/value heads (the kernels' backward accumulators a {groups}th the size)")
    if option == "auto" and not done and not why_not:
        plan.note(f"head_groups: every attention call's backward accumulators fit in "
                  f"{AUTO_GROUP_BYTES / 2**30:g} GiB (estimated): no call split")
    return gm


def auto_groups(q: torch.Tensor, k: torch.Tensor) -> int:
    """The fewest head groups (dividing k's heads) whose backward accumulators, estimated at
    ``ACCUMULATOR_BYTES_PER_Q`` per element of q, fit in ``AUTO_GROUP_BYTES``; all of k's heads
    (one per call) when none does."""
    if q.dim() != 4 or k.dim() != 4:
        return 1
    heads = k.shape[1]
    need = ACCUMULATOR_BYTES_PER_Q * q.numel()
    return next((g for g in range(1, heads + 1) if heads % g == 0 and need <= g * AUTO_GROUP_BYTES), heads)


def cannot_split(node: fx.Node, groups: int) -> str | None:
    """Why the SDPA call ``node`` cannot run as ``groups`` head groups (None if it can)."""
    a = sdpa_args(node)
    if a["dropout_p"] != 0.0:
        return "it has dropout (the groups would draw other random numbers)"
    q, k, v = (val(a[name]) for name in ("query", "key", "value"))
    if any(t.dim() != 4 for t in (q, k, v)):
        return f"q, k, v are not [B, N, S, H] ({q.dim()}, {k.dim()}, {v.dim()} dims)"
    if k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads and {k.shape[1]}, {v.shape[1]} key/value heads"
    if k.shape[1] != q.shape[1] and not a.get("enable_gqa", False):
        return "grouped key/value heads without enable_gqa"
    if k.shape[1] % groups:
        return f"{groups} groups do not divide its {k.shape[1]} key/value heads"
    mask = a["attn_mask"]
    if mask is not None and val(mask).dim() == 4 and val(mask).shape[1] != 1:
        return "its mask has a head dimension"
    return None
