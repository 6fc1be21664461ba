"""causal_mask: an attention mask that is provably the causal mask becomes ``is_causal=True``.

Under ``torch.compile`` Hugging Face models build the causal mask as a tensor (transformers
cannot skip it while tracing) and call SDPA with ``attn_mask=mask, is_causal=False``. The
mask is ``[B, 1, S, S]`` booleans (4 GiB at S = 64K) and it costs the fast kernels: cuDNN with
a dense mask ran at a quarter of its causal rate on H200. This pass proves, from the graph
alone, that a mask is ``mask[..., i, j] = (j <= i)`` and then calls SDPA with ``is_causal=True``
and no mask; the mask's nodes become dead code. Exact: nothing is guessed, and a mask that is
anything else (padding, a sliding window, data from an input) is left as it was here.

Before::

    q_idx = arange(S)[None, None, :, None]; kv_idx = arange(S)[None, None, None, :]
    mask = (kv_idx <= q_idx).expand(B, -1, S, S)
    o = sdpa(q, k, v, attn_mask=mask, is_causal=False)

After::

    o = sdpa(q, k, v, is_causal=True)

The proof is an abstract interpretation of the mask's ancestors (``_index_algebra``): every
integer tensor an affine function of its indices, every boolean a constant or ``affine <= 0``;
any other op, or a graph input, makes the value unknown and the mask is kept. The causal mask
is ``j - i <= 0`` over the last two dims and nothing else. SDPA's ``is_causal``
is the upper-left causal mask, the same predicate, for any query and key lengths.

A mask that is kept gets a note with the bytes it is built in on every rank, unless it is
proven causal *within documents* or *inside a sliding window* (``document_mask.document_form``:
transformers' packed-sequence mask, made when ``position_ids`` are passed, and its
sliding-window masks): then it is marked on its SDPA call (``DOCUMENT_MASK``) for pass
``document_mask``, which runs it as document attention after ``shard_sequence`` or says why not.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autosp._torch_private import size_hint
from autosp.graph_utils import eliminate_dead_code, human_bytes, val
from autosp.passes._attention import additive_source, masked_calls
from autosp.passes._index_algebra import abstract, is_causal
from autosp.passes.document_mask import DOCUMENT_MASK, document_form


def causal_mask_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Replace masks proven causal by ``is_causal=True``."""
    plan = gm.meta["autosp.plan"]
    memo: dict[fx.Node, object] = {}
    changed = []
    kept: dict[fx.Node, list[str]] = {}  # a mask not proven -> the calls that read it (one note a mask)
    for node, _, mask in masked_calls(gm.graph):
        source = additive_source(mask) or mask
        if not is_causal(abstract(source, memo), val(source)):
            form = document_form(source, memo) if "document_mask" not in cfg.options.disable_passes else None
            if form is not None:
                node.meta[DOCUMENT_MASK] = form.describe()  # pass document_mask rewrites it, or says why not
            else:
                kept.setdefault(mask, []).append(node.name)
            continue
        args = list(node.args)
        kwargs = dict(node.kwargs)
        if len(args) > 3:
            args[3] = None
        else:
            kwargs["attn_mask"] = None
        if len(args) > 5:
            args[5] = True
        else:
            kwargs["is_causal"] = True
        node.args, node.kwargs = tuple(args), kwargs
        changed.append(node.name)
    for mask, calls in kept.items():
        plan.note(_kept_note(calls, mask))
    if changed:
        eliminate_dead_code(gm.graph)
        gm.recompile()
        plan.note(f"attention mask proven causal: {', '.join(changed)} run with is_causal=True (the mask is never built)")
    return gm


def _kept_note(calls: list[str], mask: fx.Node) -> str:
    """What keeping ``mask`` (read by the SDPA ``calls``) costs."""
    v = val(mask)
    who = ", ".join(calls) if len(calls) <= 3 else f"{calls[0]} and {len(calls) - 1} more calls"
    if not isinstance(v, torch.Tensor):
        return f"{who}: its attention mask is not provably causal and is kept"
    # The bytes behind the mask: broadcast (stride 0) dims are stored once.
    sizes, strides = [size_hint(n) for n in v.shape], [size_hint(st) for st in v.stride()]  # dynamic: the hints
    stored = (1 + sum((n - 1) * st for n, st in zip(sizes, strides, strict=True) if st > 0)) * v.element_size()
    text = (f"{who}: its attention mask is not provably causal and is kept: "
            f"[{', '.join(map(str, v.shape))}] {str(v.dtype).removeprefix('torch.')}, {human_bytes(stored)} built on "
            "every rank (the whole sequence's, also under sequence parallelism), and SDPA's cuDNN and flash "
            "kernels take no mask")
    return text
