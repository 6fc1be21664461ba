"""document_mask: attention masked to causal-within-documents runs as ``autosp::document_attention``.

Packed sequences put several documents in one row; a token attends to the earlier tokens of
its own document only. Given ``position_ids`` (and no ``attention_mask``) transformers builds
that mask under ``torch.compile`` from the position steps, as ``[B, 1, S, S]`` booleans: 512 GiB
at S = 512K, on every rank (after the all-to-all each rank attends over the whole sequence),
and SDPA's fast kernels take no mask. This pass proves from the graph that a mask is
``mask[b, h, i, j] = (j <= i) & (D[b, i] == D[b, j])`` with ``D`` the ``[B, S]`` document ids
(``causal_mask.document_ids``: exact, nothing guessed) and calls the document attention
kernel (autosp/kernels/document_attention.py) with ``D`` instead: no mask is built, and the
work is that of causal attention inside each document, not over the whole row.

It runs after ``shard_sequence``: the attention rule treats the masked call as any masked
self-attention (the mask and ``D`` are whole-sequence values every rank computes from its copy
of the inputs), and this pass then swaps the call between the all-to-alls. On one device it
swaps the model's own call.

Before (after shard_sequence; KV repeated to the local query heads)::

    D = cumsum(diff(position_ids, prepend=position_ids[:, :1] - 1) != 1, -1)    # [B, S]
    mask = (P[b, j] <= P[b, i]) & (D[b, i] == D[b, j])                        # [B, 1, S, S]
    o_BKSH = sdpa(q_BKSH, k_BKSH, v_BKSH, attn_mask=mask)

After::

    o_BKSH = document_attention(q_BKSH, k_BKSH, v_BKSH, D, scale)[0]       # the mask is dead code

A call it cannot take (dropout, ``enable_gqa``, KV heads other than the query heads, a padded
sequence) keeps its mask, with a line in the plan saying why.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from autosp._torch_private import fake_mode_of, same_size, size_hint
from autosp.graph_utils import eliminate_dead_code, human_bytes, new_node, val
from autosp.kernels.document_attention import DOCUMENT_ATTENTION
from autosp.passes._attention import SDPA_TARGETS, sdpa_args
from autosp.passes.causal_mask import DOCUMENT_MASK, document_ids


def document_mask_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Replace SDPA calls whose mask is proven document-causal by document attention."""
    plan = gm.meta["autosp.plan"]
    fake_mode = fake_mode_of([val(n) for n in gm.graph.nodes if n.op == "placeholder"])
    memo: dict = {}
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        a = sdpa_args(node)
        mask = a["attn_mask"]
        if not isinstance(mask, fx.Node) or a["is_causal"]:
            continue
        doc = document_ids(mask, memo)
        if doc is None:
            if node.meta.get(DOCUMENT_MASK):  # proven before shard_sequence, changed by it
                plan.note(f"document_mask: {node.name} keeps its document mask ({_mask_bytes(mask)}): the "
                          "sequence is padded to a multiple of the group; a length that divides evenly avoids it")
            continue
        why = _cannot_take(a, doc)
        if why:
            plan.note(f"document_mask: {node.name} keeps its document mask ({_mask_bytes(mask)}): {why}")
            continue
        with gm.graph.inserting_before(node):
            call = new_node(gm.graph, DOCUMENT_ATTENTION, (a["query"], a["key"], a["value"], doc, a.get("scale")),
                            like=node, fake_mode=fake_mode)  # (o, lse)
            out = new_node(gm.graph, operator.getitem, (call, 0), like=node, fake_mode=fake_mode)
        out.meta.update({key: value for key, value in node.meta.items() if key not in out.meta})
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        done.append(f"{out.name} (a {_mask_bytes(mask)} mask)")
    if done:
        eliminate_dead_code(gm.graph)
        gm.recompile()
        plan.note("attention masked to causal within documents (packed sequences): "
                  f"{', '.join(done)} run as document attention on the document ids; the masks are never built")
        unused = [f"{name}={value}" for name, value, off in (
            ("attention_chunks", cfg.options.attention_chunks, 1),
            ("attention_head_groups", cfg.options.attention_head_groups, 1)) if value != off]
        if unused:
            plan.note(f"document attention runs whole: {', '.join(unused)} applies to SDPA calls only (the kernel keeps "
                      "no score matrix and accumulates in registers)")
    return gm


def _cannot_take(a: dict, doc: fx.Node) -> str | None:
    """Why the kernel cannot take this call (None: it can)."""
    q, k, v = (val(a[n]) for n in ("query", "key", "value"))
    d = val(doc)
    if a["dropout_p"]:
        return "dropout"
    if a["enable_gqa"] or not (same_size(k.shape[1], q.shape[1]) and same_size(v.shape[1], q.shape[1])):
        return "key/value heads differ from the query heads"
    if q.dim() != 4 or not (same_size(q.shape[2], d.shape[1]) and same_size(k.shape[2], d.shape[1])):
        return "the attention's length is not the document ids' (a padded sequence?)"
    if not same_size(q.shape[0], d.shape[0]):
        return "the batch differs from the document ids'"
    return None


def _mask_bytes(mask: fx.Node) -> str:
    """The booleans of the mask for its batch (its heads are one broadcast copy)."""
    v = val(mask)
    return human_bytes(size_hint(v.shape[0]) * size_hint(v.shape[-2]) * size_hint(v.shape[-1])) \
        if isinstance(v, torch.Tensor) else "?"
