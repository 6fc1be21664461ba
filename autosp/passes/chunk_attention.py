"""chunk_attention: each self-attention runs as ``autosp::chunked_attention`` over sequence chunks.

With ``Config.attention_chunks = C > 1`` the SDPA call of every self-attention site becomes
FPDT-style chunked attention (autosp/kernels/chunked_attention.py): query chunk i attends to
key chunks j <= i one pair at a time (pairs above the causal diagonal are skipped), the
partial results are merged by log-sum-exp, and the backward recomputes each pair. Exact (the
same attention, another order of summation); any group size: after ``shard_sequence`` the call
it rewrites is the head-sharded one between the all-to-alls, so chunking composes with
sequence parallelism, and on one device it rewrites the model's own call.

Before (after shard_sequence; KV repeated to the local query heads)::

    k_BKSH = repeat_interleave(k_BkSH, G, dim=1); v_BKSH = repeat_interleave(v_BkSH, G, dim=1)
    o_BKSH = sdpa(q_BKSH, k_BKSH, v_BKSH, is_causal=True)

After::

    o_BKSH = chunked_attention(q_BKSH, k_BkSH, v_BkSH, True, None, C, offload, "auto")[0]

Host offload (FPDT's chunk streaming): with ``Config.offload`` and ``recompute="selective"`` (the
layers keep attention's inputs and output for the backward) the op is called with
``offload=True``: it copies the q, k, v, o and lse chunks to pinned host memory as they are made
and returns the copies as outputs, so the partitioner saves those host chunks instead of the
device tensors; its backward brings them back one chunk group at a time, the next group's copy
overlapping this one's compute (at most two groups on the device). The layer offload pass
leaves host values alone. With ``recompute="full"`` the attention itself is recomputed in the
backward, so there is nothing of it to save and the op is called without host copies;
``"auto"`` decides offload after this pass and moves whole tensors (autosp/passes/offload.py).

Grouped KV reaches the op at its own head count: a ``repeat_interleave`` over heads (autosp's
attention rule, or the model's) or Hugging Face's ``repeat_kv`` (expand + reshape) in front of SDPA is looked
through, so the repeated KV is never built for the whole sequence. A call the op cannot take
(a mask, dropout, ``enable_gqa`` with heads that do not divide) is left as it was, with a line
in the plan saying why.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from autosp._torch_private import fake_mode_of
from autosp.graph_utils import eliminate_dead_code, new_node, val
from autosp.kernels.chunked_attention import CHUNKED_ATTENTION
from autosp.passes._attention import grouped_source, sdpa_args, self_attention_calls


def chunk_attention_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Replace each self-attention SDPA by chunked attention (``Config.attention_chunks``)."""
    chunks = cfg.options.attention_chunks
    if chunks <= 1:
        return gm
    plan = gm.meta["autosp.plan"]
    offload = bool(cfg.options.offload) and cfg.options.recompute == "selective"
    fake_mode = fake_mode_of([val(n) for n in gm.graph.nodes if n.op == "placeholder"])
    done = 0
    for node in self_attention_calls(gm.graph):
        why = _cannot_chunk(node)
        if why:
            plan.note(f"chunk_attention: {node.name} left unchunked: {why}")
            continue
        a = sdpa_args(node)
        q, k, v = a["query"], _kv_source(a["key"]), _kv_source(a["value"])
        if _heads(k) != _heads(v) or _heads(q) % _heads(k):
            k, v = a["key"], a["value"]  # the two repeats differ: keep the model's repeated KV
        with gm.graph.inserting_before(node):
            call = new_node(gm.graph, CHUNKED_ATTENTION,
                            (q, k, v, bool(a["is_causal"]), a.get("scale"), chunks, offload,
                             cfg.options.attention), like=node, fake_mode=fake_mode)  # the same backend names
            out = new_node(gm.graph, operator.getitem, (call, 0), like=node, fake_mode=fake_mode)
        out.meta.update({key: value for key, value in node.meta.items() if key not in out.meta})
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        done += 1
    if done:
        eliminate_dead_code(gm.graph)
        gm.recompile()
        seq = val(q).shape[-2]
        plan.note(f"chunk_attention: {done} attention calls over {min(chunks, seq)} sequence chunks of about "
                  f"{-(-seq // chunks)} rows (pairs above the causal diagonal skipped)"
                  + ("; their saved chunks stream through pinned host memory" if offload else ""))
    return gm


def _cannot_chunk(node: fx.Node) -> str | None:
    a = sdpa_args(node)
    if a["attn_mask"] is not None:
        return "it has an attention mask (the chunked op takes causal or no mask)"
    if a["dropout_p"] != 0.0:
        return "it has dropout"
    if a["softcap"] is not None:
        return "a logit softcap (the chunked op's kernels bound no scores)"
    q, k, v = (val(a[name]) for name in ("query", "key", "value"))
    if any(t.dim() != 4 for t in (q, k, v)):
        return f"q, k, v are not [B, N, S, H] ({q.dim()}, {k.dim()}, {v.dim()} dims)"
    if k.shape != v.shape or q.shape[-2] != k.shape[-2] or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        return f"q {list(q.shape)} and k, v {list(k.shape)}, {list(v.shape)} are not one self-attention"
    if q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads"
    if q.dtype != k.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtypes {q.dtype}, {k.dtype}"
    return None


def _kv_source(kv: fx.Node) -> fx.Node:
    """The KV before a repeat over heads (query head h reads KV head h // G, the op's own rule)."""
    found = grouped_source(kv)
    return found[0] if found is not None else kv


def _heads(node: fx.Node) -> int:
    return val(node).shape[1]
