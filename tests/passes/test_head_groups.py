"""head_groups: each self-attention runs as one SDPA call per group of heads; exact."""

from __future__ import annotations

import pytest
import torch

import autosp
from autosp.passes._attention import SDPA_TARGETS, sdpa_args
from tests.harness_fake import capture
from tests.passes.models_tiny import tiny_llama


def _reference(model, ids):
    ref = model(input_ids=ids, labels=ids, use_cache=False)
    ref.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return ref.loss.detach(), grads


def _step(model, ids, compiler="aot_eager", **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=autosp.backend(logits="drop", compiler=compiler, **options))
    out = compiled(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def _sdpa(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_split_by_heads_is_exact(compiler):
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(layers=2, hidden=64, heads=8, kv_heads=4)
    loss0, grads0 = _reference(model, ids)
    loss, grads = _step(model, ids, compiler=compiler, attention_head_groups=4)
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
    for name, g in grads0.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_the_graph_has_one_call_per_group_reading_its_own_heads():
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    model = tiny_llama(layers=2, hidden=64, heads=8, kv_heads=4)
    [(gm, plan, _)] = capture(model, input_ids=ids, labels=ids, use_cache=False, world=1, logits="drop",
                              attention_head_groups=2)
    calls = _sdpa(gm)
    assert len(calls) == 4  # 2 layers x 2 groups
    starts = []
    for call in calls:
        a = sdpa_args(call)
        assert a["is_causal"] and a["attn_mask"] is None
        q, k, v = a["query"], a["key"], a["value"]
        assert q.target is torch.narrow and k.target is torch.narrow and v.target is torch.narrow
        assert q.meta["val"].shape[1] == 4 and k.meta["val"].shape[1] in (2, 4)  # KV grouped or repeated
        assert q.args[2] * k.meta["val"].shape[1] == k.args[2] * 4  # the group's KV heads are its queries'
        starts.append(q.args[2])
    assert starts == [0, 4, 0, 4]
    cats = [n for n in gm.graph.nodes if n.target is torch.cat and all(a in calls for a in n.args[0])]
    assert len(cats) == 2 and all(c.meta["val"].shape[1] == 8 for c in cats)
    assert any("head_groups: 2 attention calls each run as 2 calls over 4 query" in n for n in plan.notes), plan.notes


def test_groups_that_do_not_divide_the_kv_heads_leave_the_call_whole():
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    model = tiny_llama(layers=1, hidden=64, heads=4, kv_heads=2)
    options = dict(world=1, logits="drop", attention_head_groups=4)
    [(gm, plan, _)] = capture(model, input_ids=ids, labels=ids, use_cache=False, **options)
    [call] = _sdpa(gm)  # grouped KV (CPU flash takes it): 2 heads, 4 groups do not divide them
    assert sdpa_args(call)["enable_gqa"] and sdpa_args(call)["query"].meta["val"].shape[1] == 4
    assert any("left as one call: 4 groups do not divide its 2 key/value heads" in n for n in plan.notes), plan.notes
    # With the repeat kept (grouped_kv off) K and V have the 4 query heads: one call per head.
    [(gm, plan, _)] = capture(model, input_ids=ids, labels=ids, use_cache=False,
                              disable_passes=("grouped_kv",), **options)
    assert len(_sdpa(gm)) == 4


def test_composes_with_chunked_attention_and_selective_recompute():
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2)
    loss0, grads0 = _reference(model, ids)
    loss, grads = _step(model, ids, attention_head_groups=2, attention_chunks=3, recompute="selective")
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
    for name, g in grads0.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    [(gm, _, _)] = capture(model, input_ids=ids, labels=ids, use_cache=False, world=1, logits="drop",
                           attention_head_groups=2, attention_chunks=3)
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.autosp.chunked_attention.default]
    assert len(calls) == 4 and all(c.args[0].meta["val"].shape[1] == 2 for c in calls)


def test_auto_picks_the_fewest_groups_whose_accumulators_fit():
    from autosp.passes.head_groups import auto_groups

    def q_k(heads, kv_heads, seq):
        return torch.empty(1, heads, seq, 64, device="meta"), torch.empty(1, kv_heads, seq, 64, device="meta")

    assert auto_groups(*q_k(32, 8, 262144)) == 4  # 4 GiB of accumulators (measured): 1 GiB a call
    assert auto_groups(*q_k(16, 4, 131072)) == 1  # SP=2 at 256K tokens: 1 GiB already
    assert auto_groups(*q_k(16, 4, 524288)) == 4  # SP=2 at 1M tokens
    assert auto_groups(*q_k(16, 4, 4 * 524288)) == 4  # none fits: one KV head a call
    assert auto_groups(*q_k(12, 6, 524288)) == 3  # 3 GiB; divisors of 6: 1, 2, 3


def test_auto_splits_only_where_the_estimate_says(monkeypatch):
    from autosp.passes import head_groups

    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(5))
    model = tiny_llama(layers=1, hidden=64, heads=8, kv_heads=4)
    options = dict(world=1, logits="drop", attention_head_groups="auto")
    [(gm, plan, _)] = capture(model, input_ids=ids, labels=ids, use_cache=False, **options)
    assert len(_sdpa(gm)) == 1
    assert any("no call split" in n for n in plan.notes), plan.notes
    q_bytes = 8 * 24 * 8  # heads x tokens x head dim
    monkeypatch.setattr(head_groups, "AUTO_GROUP_BYTES", head_groups.ACCUMULATOR_BYTES_PER_Q * q_bytes // 2)
    [(gm, plan, _)] = capture(model, input_ids=ids, labels=ids, use_cache=False, **options)
    assert len(_sdpa(gm)) == 2
    assert any("1 attention calls each run as 2 calls over 4 query" in n for n in plan.notes), plan.notes


def test_option_is_checked():
    autosp.Config(attention_head_groups="auto")
    for bad in (0, -1, True, 2.0, "2", "all"):
        with pytest.raises(ValueError, match="attention_head_groups"):
            autosp.Config(attention_head_groups=bad)


@pytest.mark.gpu
def test_cuda_groups_are_exact_and_lower_the_backward_peak():
    """bf16 through Inductor on the device's attention kernel: the same loss and gradients, and
    the attention backward's accumulators a group's at a time (a lower step peak)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    seq = 32768
    model = tiny_llama(layers=2, hidden=2048, heads=32, kv_heads=8, intermediate=64).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = {}
    for groups in (1, 4):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=autosp.backend(logits="drop", recompute="full",
                                                              attention_head_groups=groups))
        for _ in range(2):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            peak = torch.cuda.max_memory_allocated() - before
            grads = {n: p.grad.float() for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
        results[groups] = (loss.detach().float(), grads, peak)
    (l1, g1, p1), (l4, g4, p4) = results[1], results[4]
    torch.testing.assert_close(l4, l1, rtol=0, atol=2e-2)
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], rtol=5e-2, atol=5e-3, msg=name)
    layer_value = seq * 2048 * 2  # one [S, hidden] bf16 value: 128 MiB
    assert p4 < p1 - layer_value, (p1, p4)  # the float32 accumulators were ~4 such values
