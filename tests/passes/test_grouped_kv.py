"""grouped_kv: the repeat of grouped K and V is folded into the SDPA call (enable_gqa); exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import autosp
from autosp.passes._attention import SDPA_TARGETS, sdpa_args
from autosp.passes.grouped_kv import kernel_refuses
from tests.harness_fake import capture
from tests.passes.models_tiny import tiny_llama


def _run(model, ids, **options):
    """Loss and gradients of one compiled step, and the graph and plan the passes made."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=autosp.backend(logits="drop", compiler="aot_eager", **options))
    out = compiled(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    [(gm, plan, _)] = capture(model, input_ids=ids, labels=ids, use_cache=False, world=1, logits="drop", **options)
    return out.loss.detach(), grads, gm, plan


def _sdpa(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


def test_folds_the_repeat_and_is_exact():
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2)
    ref = model(input_ids=ids, labels=ids, use_cache=False)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss, grads, gm, plan = _run(model, ids)
    torch.testing.assert_close(loss, ref.loss.detach(), rtol=1e-6, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    calls = _sdpa(gm)
    assert len(calls) == 2
    for call in calls:
        a = sdpa_args(call)
        assert a["enable_gqa"] is True and a["is_causal"] and a["attn_mask"] is None
        assert a["key"].meta["val"].shape[1] == 2 and a["value"].meta["val"].shape[1] == 2  # unrepeated
    assert not [n for n in gm.graph.nodes if n.target in ("expand", torch.repeat_interleave)]
    assert any("grouped_kv: 2 attention calls read K and V at their own head count" in n for n in plan.notes)


def test_disabled_or_on_the_math_kernel_keeps_the_repeat():
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(1))
    model = tiny_llama(layers=1, hidden=64, heads=4, kv_heads=2)
    for options, note in ((dict(disable_passes=("grouped_kv",)), "pass grouped_kv is disabled"),
                          (dict(attention="math"), "keeps its repeated KV: the call runs on the math kernel")):
        _, _, gm, plan = _run(model, ids, **options)
        [call] = _sdpa(gm)
        assert not sdpa_args(call)["enable_gqa"] and sdpa_args(call)["key"].meta["val"].shape[1] == 4
        assert any(note in n for n in plan.notes), plan.notes


def test_kernel_check_asks_torch_for_both_calls():
    q, k = torch.empty(1, 8, 4, 16), torch.empty(1, 2, 4, 16)
    assert kernel_refuses(q, k, True, None, "auto") is None  # CPU flash takes grouped KV
    assert "math kernel" in kernel_refuses(q, k, True, None, "math")
    assert kernel_refuses(q.to("meta"), k.to("meta"), True, None, "auto") is not None  # no fused kernel there


def test_with_chunked_attention_the_op_gets_the_grouped_kv():
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    model = tiny_llama(layers=1, hidden=64, heads=4, kv_heads=2)
    ref = model(input_ids=ids, labels=ids, use_cache=False).loss.detach()
    loss, _, gm, _ = _run(model, ids, attention_chunks=3)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    [call] = [n for n in gm.graph.nodes if n.target is torch.ops.autosp.chunked_attention.default]
    assert call.args[1].meta["val"].shape[1] == 2


@pytest.mark.gpu
def test_cuda_grouped_call_is_exact_and_needs_less_memory():
    """bf16 on the GPU through Inductor: the grouped call runs on the kernel the repeated one did
    (cuDNN or flash) and gives the same loss and gradients, with less memory at the peak."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    model = tiny_llama(layers=2, hidden=1024, heads=16, kv_heads=4).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 16384), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = {}
    for on in (False, True):
        torch._dynamo.reset()
        options = {} if on else {"disable_passes": ("grouped_kv",)}
        compiled = torch.compile(model, backend=autosp.backend(logits="drop", **options))
        for _ in range(2):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            peak = torch.cuda.max_memory_allocated() - before
            grads = {n: p.grad.float() for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
        results[on] = (loss.detach().float(), grads, peak)
    (l0, g0, p0), (l1, g1, p1) = results[False], results[True]
    torch.testing.assert_close(l1, l0, rtol=0, atol=2e-2)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=5e-2, atol=5e-3, msg=name)
    repeated_kv = 2 * 16384 * 1024 * 2  # K and V at 16 heads of 64, bf16
    assert p1 < p0 - repeated_kv // 2, (p0, p1)


def test_sdpa_grouped_reference():
    """The identity the pass relies on: grouped SDPA equals SDPA on KV repeated per head."""
    q, k, v = torch.randn(1, 6, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    grouped = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    repeated = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
    torch.testing.assert_close(grouped, repeated)


def test_only_a_true_repeat_is_read_as_one():
    """HF's repeat_kv (``x[:, :, None].expand(..).reshape(..)``) is a repeat; the same shapes made
    with an index tensor along the sequence (found by review) reorder keys and are not."""
    from autosp.passes._attention import grouped_source

    seen = {}

    def backend(gm, example_inputs):
        seen.setdefault("gms", []).append(gm)
        return gm.forward

    def repeat(k):
        b, n, s, d = k.shape
        return k[:, :, None, :, :].expand(b, n, 2, s, d).reshape(b, n * 2, s, d)

    def reorder(k, perm):
        b, n, s, d = k.shape
        return k[:, :, None, perm].expand(b, n, 2, s, d).reshape(b, n * 2, s, d)

    torch._dynamo.reset()
    k = torch.randn(1, 2, 6, 4)
    torch.compile(repeat, backend=backend)(k)
    torch.compile(reorder, backend=backend)(k, torch.randperm(6))
    outs = [[n for n in gm.graph.nodes if n.target == "reshape"][-1] for gm in seen["gms"]]
    found = grouped_source(outs[0])
    assert found is not None and found[1] == 2
    assert grouped_source(outs[1]) is None


def test_repeat_interleave_over_the_heads_in_either_form_is_a_repeat():
    """The model's own ``repeat_interleave`` over the head dim (function or tensor method, dim 1
    or -3) is read as a repeat; over the sequence or by a tensor of repeats it is not."""
    from autosp.passes._attention import grouped_source

    gms = []

    def backend(gm, example_inputs):
        gms.append(gm)
        return gm.forward

    fns = {
        "method": (lambda k: k.repeat_interleave(3, dim=1), 3),
        "method, positional": (lambda k: k.repeat_interleave(2, 1), 2),
        "function, dim -3": (lambda k: torch.repeat_interleave(k, 2, dim=-3), 2),
        "function, keywords": (lambda k: torch.repeat_interleave(k, repeats=4, dim=1), 4),
        "over the sequence": (lambda k: k.repeat_interleave(2, dim=2), None),
        "by a tensor": (lambda k: k.repeat_interleave(torch.tensor([1, 2]), dim=1), None),
    }
    k = torch.randn(1, 2, 6, 4)
    for name, (fn, want) in fns.items():
        torch._dynamo.reset()
        gms.clear()
        torch.compile(fn, backend=backend, fullgraph=True)(k)
        [out] = [n for n in gms[0].graph.nodes if n.op == "output"][0].args[0]
        found = grouped_source(out)
        assert (found and found[1]) == want, (name, found)
