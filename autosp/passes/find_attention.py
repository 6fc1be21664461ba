"""find_attention: find the self-attention sites and the global sequence length S.

Analysis only: each SDPA node gets ``meta["autosp.site"]`` and a line in the plan; the region's
``ShardContext`` is created here once S is known. A site is rewritten when it attends over the
sequence its query comes from (query and key have the same length S); cross-attention (lengths
differ) and attention over some other length are left alone and reported. A training region
that returns the keys and values its attention uses (HF's ``use_cache=True``: a KV cache) gets
a note and a warning: those tensors stay alive through the forward and take zero gradients.

Before / after: the graph is unchanged; ``plan.sites`` lists, e.g.::

    sdpa    self-attention  q [2, 4, 17, 8]  k [2, 2, 17, 8]  causal  -> rewritten
    sdpa_1  cross-attention q [2, 4, 17, 8]  k [2, 4, 9, 8]          -> left alone
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from autosp._torch_private import fake_mode_of, same_size
from autosp.graph_utils import is_view, tensor_bytes, val
from autosp.passes._attention import SDPA_TARGETS, sdpa_args
from autosp.passes._context import SITE, ShardContext
from autosp.plan import Site

log = logging.getLogger(__name__)
# What carries a key or value from a returned cache tensor to SDPA, besides views (HF's
# DynamicCache concatenation and repeat_kv)
_KV_PATH = {torch.cat, torch.repeat_interleave, "repeat_interleave", "repeat"}


def find_attention_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Mark self-attention sites; set up the region's sharding context when there is one."""
    plan = gm.meta["autosp.plan"]
    seq_len = None
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        a = sdpa_args(node)
        q, k = val(a["query"]), val(a["key"])
        shapes = f"q {list(q.shape)} k {list(k.shape)}" + (" causal" if a["is_causal"] else "")
        if q.dim() < 3 or k.dim() != q.dim():
            kind, ok = "attention without a head dim", False
        elif not same_size(q.shape[-2], k.shape[-2]):
            kind, ok = "cross-attention (query and key lengths differ): left alone", False
        elif seq_len is not None and not same_size(q.shape[-2], seq_len):
            kind, ok = f"attention over another length than S={seq_len}: left alone", False
        else:
            kind, ok = "self-attention", cfg.world > 1
            seq_len = q.shape[-2]
        if kind == "self-attention" and not ok:
            kind += " (group of size 1: nothing to shard)"
        node.meta[SITE] = {"rewrite": ok, "kind": kind}
        plan.sites.append(Site(node=node.name, kind=kind, rewritten=ok, detail=shapes))
    if not plan.sites:
        plan.note("no attention found: the region runs unchanged on every rank (full sequence)")
    _note_returned_kv(gm, plan)
    if seq_len is None or not plan.active:
        return gm
    plan.seq_len = str(seq_len)
    fake_mode = fake_mode_of([val(n) for n in gm.graph.nodes if n.op == "placeholder"])
    gm.meta["autosp.context"] = ShardContext(
        graph=gm.graph,
        fake_mode=fake_mode,
        plan=plan,
        world=cfg.world,
        rank=cfg.rank,
        group_name=cfg.group_name,
        seq_len=seq_len,
    )
    return gm


def _note_returned_kv(gm: fx.GraphModule, plan) -> None:
    """Say so when a training region returns the keys and values its attention uses (a KV cache:
    HF's ``use_cache=True``): they stay alive through the forward and each gets a zero gradient."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    returned = set(output.all_input_nodes)
    found: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        a = sdpa_args(node)
        todo = [(a["key"], 0), (a["value"], 0)]
        while todo:
            n, depth = todo.pop()
            if not isinstance(n, fx.Node) or depth > 8:
                continue
            if n in returned:
                found.add(n)
            if n.target in _KV_PATH or is_view(n):
                todo += [(x, depth + 1) for x in n.all_input_nodes]
    trained = [n for n in found if isinstance(val(n), torch.Tensor) and val(n).requires_grad]
    if not trained:
        return
    size = sum(tensor_bytes(val(n)) for n in trained) / 2**30
    msg = (f"the region returns {len(trained)} keys/values its attention uses ({size:.2f} GiB at these shapes: a KV "
           "cache, HF's use_cache=True); in training they stay alive through the forward and the backward gets a "
           "zero gradient for each: pass use_cache=False to train")
    plan.note(msg)
    log.warning("autosp: %s", msg)
