"""Tier 1: the passes on graphs traced with a fake process group: structure and meta["val"]."""

from __future__ import annotations

import torch
from torch.testing import FileCheck

from autosp.graph_utils import fake_eval, val
from tests.harness_fake import capture, fake_group
from tests.passes.models_tiny import Attn, tiny_llama


def _llama_call(S=17, B=1):
    ids = torch.randint(0, 128, (B, S), generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, labels=ids, use_cache=False)


def test_llama_two_ranks_structure_and_shapes():
    with fake_group(2):
        [(gm, plan, _)] = capture(tiny_llama(layers=2), **_llama_call(S=17), fused_loss=False)
    code = gm.code
    FileCheck().check_count("seq_to_head_many(", 2, exactly=True).run(code)  # q, k, v of 2 layers, one each
    FileCheck().check_count("head_to_seq(", 2, exactly=True).run(code)
    FileCheck().check_count("all_reduce_sum(", 1, exactly=True).run(code)  # the loss
    FileCheck().check("reduction = 'sum'").check_not("reduction = 'mean'").run(code)
    assert [s.rewritten for s in plan.sites] == [True, True]
    assert plan.fallbacks == []
    assert plan.seq_len == "17"
    by_target = {}
    for n in gm.graph.nodes:
        by_target.setdefault(getattr(n.target, "__name__", str(n.target)), []).append(n)
    emb = by_target["embedding"][0]
    assert list(val(emb).shape) == [1, 9, 32]  # ceil(17 / 2) positions of this rank
    q_h, k_h, _ = sorted(by_target["seq_to_head_many"][0].users, key=lambda u: u.args[1])
    assert list(val(q_h).shape) == [1, 2, 18, 8]  # 2 of 4 heads, the padded sequence 2 * 9
    assert list(val(k_h).shape) == [1, 1, 18, 8]  # KV crosses at its own head count (1 of 2)


def test_every_value_is_consistent_with_its_inputs():
    with fake_group(2):
        [(gm, _, _)] = capture(tiny_llama(), **_llama_call(S=19, B=2))
        for n in gm.graph.nodes:
            if n.op in ("call_function", "call_method") and isinstance(val(n), torch.Tensor):
                again = fake_eval(n, val(n).fake_mode)
                assert again.shape == val(n).shape, n.format_node()
                assert again.dtype == val(n).dtype, n.format_node()


def test_four_ranks_sixteen_positions():
    with fake_group(4):
        [(gm, plan, _)] = capture(tiny_llama(), **_llama_call(S=16))
    shapes = [list(val(n).shape) for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "embedding"]
    assert shapes == [[1, 4, 32]]
    notes = "\n".join(plan.notes)
    assert "replicated x2" in notes  # 2 KV heads over 4 ranks


def test_heads_not_divisible_are_padded():
    with fake_group(4):
        [(gm, plan, _)] = capture(Attn(heads=6), torch.randint(0, 64, (1, 13)))
    assert "heads padded 6 -> 8" in "\n".join(plan.notes)
    assert plan.fallbacks == []


def test_one_process_leaves_the_graph_unchanged():
    [(gm, plan, _)] = capture(tiny_llama(), **_llama_call())
    assert plan.world == 1 and not plan.active
    assert all(before == after for name, before, after in plan.passes
               if name not in ("causal_mask", "fused_loss", "grouped_kv"))
    assert [s.rewritten for s in plan.sites] == [False]


def test_cross_attention_is_left_alone():
    with fake_group(2):
        [(gm, plan, _)] = capture(Attn(), torch.randint(0, 64, (1, 17)), torch.randint(0, 64, (1, 9)))
    assert len(plan.sites) == 1 and not plan.sites[0].rewritten
    assert "cross-attention" in plan.sites[0].kind


def test_op_without_rule_falls_back_to_a_gather():
    with fake_group(2):
        [(gm, plan, _)] = capture(Attn(cumsum=True), torch.randint(0, 64, (1, 17)))
    assert any("cumsum" in f.op for f in plan.fallbacks), plan.fallbacks
    assert any(c.kind == "all_gather" for c in plan.collectives)


def test_model_without_attention_is_unchanged():
    with fake_group(2):
        [(gm, plan, _)] = capture(torch.nn.Linear(4, 4), torch.randn(3, 17, 4))
    assert plan.sites == [] and not plan.active
    assert any("no attention" in n for n in plan.notes)


def test_inputs_and_cuts_are_reported():
    with fake_group(2):
        [(_, plan, _)] = capture(tiny_llama(), **_llama_call(S=17))
    assert any("sequence on dim 1" in i for i in plan.inputs)
    assert any("embedding" in c.detail for c in plan.cuts)  # ids cut right before the embedding
    assert any("cross_entropy" in c.detail for c in plan.cuts)  # labels shifted on the full sequence first


def test_global_loss_alone_is_exact_on_one_device():
    """sum / count of valid targets is the mean cross-entropy: run the rewritten graph itself."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, 3:7] = -100
    with fake_group(2):
        [(gm, plan, inputs)] = capture(model, input_ids=ids, labels=labels, use_cache=False,
                                       options={"disable_passes": ["shard_sequence", "output_layout", "fused_loss"]})
    assert "pass shard_sequence is disabled" in plan.notes
    FileCheck().check("reduction = 'sum'").check("truediv").run(gm.code)
    with torch.no_grad():
        loss = gm(*inputs)[0]
        want = model(input_ids=ids, labels=labels, use_cache=False).loss
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
