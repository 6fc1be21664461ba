"""grouped_kv: grouped-query attention reads K and V at their own head count.

A model with fewer KV heads than query heads repeats K and V to the query heads before SDPA
(Hugging Face's ``repeat_kv``, or ``repeat_interleave`` over the heads, as a function or a tensor
method; autosp's attention rule likewise, after the all-to-all). At long
sequences those copies are large: K and V repeated 4x at 1M tokens and 32 heads of 64 are
4 GiB each, their gradients as much again, all alive in a layer's backward. cuDNN's and
FlashAttention's SDPA kernels take grouped KV themselves (``enable_gqa=True``; measured on an
H100 with torch 2.11 at the same speed as on repeated KV, ``benchmarks/sdpa_backends.py``), so
the repeat is folded into the call::

    k_BKSH = repeat_interleave(k_BkSH, G, dim=1); v_BKSH = ...      # or expand + reshape
    o = sdpa(q_BKSH, k_BKSH, v_BKSH, is_causal=True)
    ->
    o = sdpa(q_BKSH, k_BkSH, v_BkSH, is_causal=True, enable_gqa=True)

Exact: query head h reads KV head h // G either way, and the gradient of a repeated KV head is
the sum over its group in both. The rewrite is made only where torch would run the *same*
kernel on the grouped call as on the repeated one (asked of torch's own dispatcher, within the
``Config.attention`` restriction, on small tensors of the call's device, dtype and head counts):
the memory-efficient kernel does not take grouped KV, and the math fallback would repeat them
anyway. Calls with a mask or dropout are left as they are. Document attention (pass
``document_mask``'s, autosp/kernels/document_attention.py) reads grouped KV itself: its repeat
is always folded. Runs on any group size.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autosp import _torch_private
from autosp.graph_utils import eliminate_dead_code, val
from autosp.kernels.document_attention import DOCUMENT_ATTENTION
from autosp.passes._attention import SDPA_TARGETS, attention_kernel_context, grouped_source, sdpa_args
from autosp.passes._context import SITE


def grouped_kv_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Fold the repeat of grouped K and V into each self-attention call the device's kernel takes."""
    plan = gm.meta["autosp.plan"]
    folded, why_not, answers = [], {}, {}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is DOCUMENT_ATTENTION:
            group = _fold_into_document_attention(node)
            if group:
                folded.append((node.name, group))
            continue
        if node.op != "call_function" or node.target not in SDPA_TARGETS or SITE not in node.meta:
            continue
        a = sdpa_args(node)
        if a["softcap"] is not None:
            continue  # softcap_attention repeats grouped KV itself: nothing to fold into a kernel
        k_src, v_src = grouped_source(a["key"]), grouped_source(a["value"])
        if a["enable_gqa"] or k_src is None or v_src is None or k_src[1] != v_src[1]:
            continue  # no repeated KV to fold
        (k, group), (v, _) = k_src, v_src
        if a["attn_mask"] is not None or a["dropout_p"] != 0.0:
            why_not[node.name] = "it has a mask or dropout"
            continue
        q_v, k_v = val(a["query"]), val(k)
        key = (q_v.shape[1], k_v.shape[1], q_v.shape[-1], q_v.dtype, q_v.device, bool(a["is_causal"]), a.get("scale"))
        if key not in answers:  # every layer asks the same question: once
            answers[key] = kernel_refuses(q_v, k_v, bool(a["is_causal"]), a.get("scale"), cfg.options.attention)
        why = answers[key]
        if why:
            why_not[node.name] = why
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        for i, name, new in ((1, "key", k), (2, "value", v)):
            if len(args) > i:
                args[i] = new
            else:
                kwargs[name] = new
        kwargs["enable_gqa"] = True
        node.args, node.kwargs = tuple(args), kwargs  # its value (the output) is unchanged
        folded.append((node.name, group))
    for name, why in why_not.items():
        plan.note(f"grouped_kv: {name} keeps its repeated KV: {why}")
    if folded:
        eliminate_dead_code(gm.graph)
        gm.graph.lint()
        gm.recompile()
        groups = sorted({g for _, g in folded})
        plan.note(f"grouped_kv: {len(folded)} attention calls read K and V at their own head count "
                  f"(enable_gqa or document attention; repeat x{', x'.join(map(str, groups))} folded into the kernel)")
    return gm


def _fold_into_document_attention(node: fx.Node) -> int | None:
    """Give document attention (which reads KV head h // G itself) the unrepeated K and V; the group G."""
    k_src, v_src = grouped_source(node.args[1]), grouped_source(node.args[2])
    if k_src is None or v_src is None or k_src[1] != v_src[1]:
        return None
    node.args = (node.args[0], k_src[0], v_src[0], *node.args[3:])
    return k_src[1]


def kernel_refuses(q: torch.Tensor, k: torch.Tensor, is_causal: bool, scale, kernel: str) -> str | None:
    """Why the SDPA kernel torch would run on the repeated KV cannot take the grouped call (None
    if it can): torch's dispatcher is asked for both, on small tensors like the call's."""
    from torch.nn.attention import SDPBackend

    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[-1]
    try:
        with torch.no_grad(), attention_kernel_context(kernel):
            q_s = torch.zeros(1, heads, 128, dim, dtype=q.dtype, device=q.device)
            k_s = torch.zeros(1, kv_heads, 128, dim, dtype=k.dtype, device=k.device)
            k_rep = k_s.repeat_interleave(heads // kv_heads, dim=1)
            repeated = _torch_private.sdpa_backend_choice(q_s, k_rep, k_rep, is_causal, scale)
            grouped = _torch_private.sdpa_backend_choice(q_s, k_s, k_s, is_causal, scale)
    except (RuntimeError, NotImplementedError) as e:  # a device torch cannot ask (meta)
        return f"torch's kernel choice could not be asked on {q.device} ({str(e).splitlines()[0][:80]})"
    if repeated == SDPBackend.MATH:
        return "the call runs on the math kernel, which repeats KV itself"
    if grouped != repeated:
        return f"the {repeated.name} kernel does not take grouped KV (torch would run {grouped.name})"
    return None
