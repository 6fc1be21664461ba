"""eager_attention: attention written out as matmul, softmax, matmul becomes one SDPA call.

Hugging Face's ``attn_implementation="eager"`` (and hand-written models) spell attention out::

    w = matmul(q, k.transpose(2, 3)) * scaling          # [B, H, S, S] scores
    w = w + mask                                         # additive mask (optional)
    w = softmax(w, dim=-1, dtype=float32).to(q.dtype)
    w = dropout(w, p=0.0, training=...)                  # optional
    o = matmul(w, v)

Every other pass looks for attention as SDPA calls, so such a model ran unsharded on every rank
(the whole sequence, the ``[B, H, S, S]`` scores in memory). This pass rewrites the chain into::

    o = scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)

the same function: SDPA adds a float ``attn_mask`` to the scaled scores as the chain does (a
boolean mask keeps where True), takes the softmax over the keys and weighs ``v``; its kernels
keep the softmax in float32 as the chain's ``dtype=float32`` does. The scores are never built,
and the call is an attention site like any other: ``causal_mask`` may prove its mask causal
(it sees through transformers' ``where(mask, 0, finfo.min)``), ``shard_sequence`` puts it
between the all-to-alls. Rounding differs from the chain's (the weights are not rounded to
the inputs' dtype before the second matmul), as any fused kernel's does.

A logit softcap between the scale and the mask (Gemma 2: ``w = tanh(w / c) * c``) is part of
the chain too; no SDPA kernel bounds scores, so such a chain becomes
``softcap_attention(q, k, v, attn_mask=mask, scale=scaling, softcap=c)``
(autosp/kernels/softcap_attention.py): SDPA's signature, its scores built in torch ops, and a
site the other passes move and split as they do SDPA calls; ``document_mask`` later runs the
causal and windowed ones in its kernel, the scores bounded in the tile.

Rewritten only when the chain's values are read by nothing else (no returned attention weights),
the softmax runs over the keys, the scale is a number applied before the mask, q, k, v and the
weights have one dtype, the mask is boolean or of that dtype and needs no gradient, and dropout is off (``p == 0``, or
not training: SDPA's dropout draws other random numbers than ``F.dropout``). A chain that
matches up to one of these gets a plan line saying which; it runs as written. Any group size
(the fused kernel pays on one GPU too).
"""

from __future__ import annotations

import contextlib
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from autosp._torch_private import fake_mode_of
from autosp.graph_utils import eliminate_dead_code, new_node, val
from autosp.kernels.softcap_attention import softcap_attention

_MATMULS = {torch.matmul, operator.matmul, "matmul"}
_SOFTMAX = {F.softmax, torch.softmax, "softmax"}
_DROPOUT = {F.dropout, torch.dropout, "dropout"}
_ADD = {operator.add, torch.add, "add"}
_MUL = {operator.mul, torch.mul, "mul"}
_DIV = {operator.truediv, torch.div, "div"}
_TRANSPOSE = {torch.transpose, "transpose"}
_CASTS = {"to", "type_as", "type"}
_TANH = {torch.tanh, torch.nn.functional.tanh, "tanh"}


def eager_attention_pass(gm: fx.GraphModule, example_inputs, *, cfg) -> fx.GraphModule:
    """Replace spelled-out attention chains by SDPA calls."""
    plan = gm.meta["autosp.plan"]
    fake_mode = None
    rewritten, capped = [], []
    for node in list(gm.graph.nodes):
        if not _is(node, _MATMULS):
            continue
        found = _match(node)
        if found is None:
            continue
        if isinstance(found, str):
            plan.note(f"eager attention at {node.name} left as written: {found}")
            continue
        q, k, v, mask, scale, softcap = found
        if fake_mode is None:  # the graph's fake mode (a graph of real example values: none needed)
            fake_mode = fake_mode_of([val(n) for n in gm.graph.nodes if n.op == "placeholder"]) or contextlib.nullcontext()
        kwargs = {"attn_mask": mask, "dropout_p": 0.0, "is_causal": False, "scale": scale}
        target = F.scaled_dot_product_attention
        if softcap is not None:
            target, kwargs["softcap"] = softcap_attention, softcap
            capped.append(node.name)
        with gm.graph.inserting_before(node):
            sdpa = new_node(gm.graph, target, (q, k, v), kwargs, like=node, fake_mode=fake_mode)
        node.replace_all_uses_with(sdpa)
        rewritten.append(node.name)
    if rewritten:
        eliminate_dead_code(gm.graph)
        gm.recompile()
        plan.note(f"eager attention: {len(rewritten)} matmul-softmax-matmul chains run as SDPA calls "
                  f"({', '.join(rewritten[:3])}{', ...' if len(rewritten) > 3 else ''})")
    if capped:
        plan.note(f"eager attention: {len(capped)} of them bound their scores (a logit softcap, Gemma 2's) and run "
                  "as softcap_attention (document_mask moves those with a causal or windowed mask into its kernel)")
    return gm


def _match(out: fx.Node):
    """``(q, k, v, mask, scale, softcap)`` if ``out = matmul(weights, v)`` ends an attention chain
    that SDPA computes (softcap None), or SDPA with its scores bounded by ``softcap``; a reason
    (str) if it ends one SDPA does not take; None if it ends none."""
    if len(out.args) != 2 or out.kwargs:
        return None
    w, v = out.args
    chain = []  # the chain's nodes, each read by nothing but the next one
    dropout = None
    if _is(w, _DROPOUT):
        dropout, w = w, w.args[0]
        chain.append(dropout)
    cast = None
    if _is(w, _CASTS):
        cast, w = w, w.args[0]
        chain.append(cast)
    if not _is(w, _SOFTMAX):
        return None
    softmax = w
    chain.append(softmax)
    scores = softmax.args[0]
    mask = None
    if _is(scores, _ADD) and len(scores.args) == 2 and not scores.kwargs:
        a, b = scores.args
        scaled, mask = (a, b) if _is_scores(a) else (b, a)
        chain.append(scores)
        scores = scaled
    capped = _softcap(scores)
    softcap = None
    if capped is not None:
        scores, softcap, nodes = capped
        chain += nodes
    scale = 1.0
    if _is(scores, _MUL | _DIV) and len(scores.args) == 2 and not scores.kwargs:
        a, b = scores.args
        number, product = (b, a) if isinstance(b, (int, float)) else (a, b)
        if _number(number) and isinstance(product, fx.Node):
            if _is(scores, _DIV) and (number == 0 or product is not a):
                return None  # number / scores: not a scale
            chain.append(scores)
            scale = 1.0 / number if _is(scores, _DIV) else float(number)
            scores = product
    if not _is(scores, _MATMULS) or len(scores.args) != 2:
        return None
    q, kt = scores.args
    k = _transposed(kt)
    if k is None:
        return None
    chain += [scores, kt]
    if not all(isinstance(n, fx.Node) and isinstance(val(n), torch.Tensor) for n in (q, k, v)):
        return None
    qv, kv, vv = val(q), val(k), val(v)
    if min(qv.dim(), kv.dim(), vv.dim()) < 3 or not (qv.dim() == kv.dim() == vv.dim()):
        return None
    if qv.shape[-1] != kv.shape[-1] or kv.shape[-2] != vv.shape[-2]:
        return None
    # From here on the chain is attention: what SDPA cannot take gets a reason.
    readers = [n for n in chain if len(n.users) != 1]
    if readers:
        return f"its attention weights or scores are read elsewhere ({readers[0].name})"
    dim = softmax.kwargs.get("dim", softmax.args[1] if len(softmax.args) > 1 else None)
    if dim not in (-1, val(softmax).dim() - 1):
        return f"the softmax runs over dim {dim}, not the keys"
    if dropout is not None:
        p = dropout.kwargs.get("p", dropout.args[1] if len(dropout.args) > 1 else 0.5)
        training = dropout.kwargs.get("training", dropout.args[2] if len(dropout.args) > 2 else True)
        if not isinstance(p, (int, float)) or not isinstance(training, bool):
            return "its dropout probability or training flag is not a constant"
        if p != 0 and training:
            return f"dropout p={p} in training (SDPA's dropout draws other random numbers than F.dropout)"
    dtypes = {qv.dtype, kv.dtype, vv.dtype, val(w if cast is None else cast).dtype}
    if len(dtypes) != 1:
        return f"q, k, v and the weights have different dtypes ({', '.join(sorted(map(str, dtypes)))})"
    if mask is not None:
        if not isinstance(mask, fx.Node) or not isinstance(val(mask), torch.Tensor):
            return "its mask is not a tensor"
        if val(mask).dtype not in (torch.bool, qv.dtype):
            return f"its mask is {val(mask).dtype}, q is {qv.dtype}"
        if val(mask).requires_grad:
            return "its mask is learned (it needs a gradient, which not every SDPA kernel gives)"
    return q, k, v, mask, scale, softcap


def _softcap(node) -> tuple[fx.Node, float, list[fx.Node]] | None:
    """``(x, c, its nodes)`` if ``node`` is ``tanh(x / c) * c`` (Gemma 2's logit softcap; either
    factor order, ``x * (1 / c)`` for the division), c a positive number; else None."""
    if not (_is(node, _MUL) and len(node.args) == 2 and not node.kwargs):
        return None
    a, b = node.args
    cap, tanh = (b, a) if _is(a, _TANH) else (a, b)
    if not (_is(tanh, _TANH) and len(tanh.args) == 1 and not tanh.kwargs) or not _number(cap) or cap <= 0:
        return None
    inner = tanh.args[0]
    if not (_is(inner, _MUL | _DIV) and len(inner.args) == 2 and not inner.kwargs):
        return None
    x, d = inner.args
    if _is(inner, _MUL) and _number(x):
        x, d = d, x
    if not isinstance(x, fx.Node) or not _number(d):
        return None
    divisor = d if _is(inner, _DIV) else (1.0 / d if d else None)
    if divisor is None or not math.isclose(divisor, cap, rel_tol=1e-6):
        return None
    return x, float(cap), [node, tanh, inner]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def _is_scores(node) -> bool:
    """Whether ``node`` is (a softcap of) (a scaling of) a matmul: the scores side of ``scores + mask``."""
    capped = _softcap(node)
    if capped is not None:
        node = capped[0]
    if _is(node, _MUL | _DIV):
        node = next((a for a in node.args if isinstance(a, fx.Node)), None)
    return _is(node, _MATMULS)


def _transposed(kt) -> fx.Node | None:
    """k if ``kt`` is k with its last two dims swapped."""
    if not _is(kt, _TRANSPOSE) or len(kt.args) != 3 or not isinstance(val(kt), torch.Tensor):
        return None
    k, a, b = kt.args
    n = val(kt).dim()
    if not isinstance(a, int) or not isinstance(b, int) or {a % n, b % n} != {n - 2, n - 1}:
        return None
    return k
