"""shard_sequence: every op on this rank's shard, all-to-all around attention, fallbacks recorded.

Graphs are traced as one rank of a fake group; ``meta["val"]`` holds this rank's local values
and ``meta["autosp.global_val"]`` the one-device ones.

Legend: B batch, S global sequence, L local sequence ceil(S/P), N heads, K local heads,
H head dim, D hidden, V vocab, P ranks.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import FileCheck

from autosp import collectives
from autosp._torch_private import fake_mode_of
from autosp.graph_utils import SIDE_EFFECT_TARGETS, fake_eval
from autosp.passes._attention import SDPA_TARGETS
from tests.harness_fake import capture, fake_group, nodes_calling, shape_of
from tests.passes.models_tiny import tiny_llama

VOCAB = 64
AUTOSP_CALLS = (collectives.seq_to_head, collectives.head_to_seq, collectives.gather_seq, collectives.all_reduce_sum,
                collectives.shard_seq, collectives.unshard_seq)


class Block(nn.Module):
    """Embedding, causal attention with ``heads`` heads of 4, optionally a cumsum over the sequence."""

    def __init__(self, heads: int = 4, cumsum: bool = False, scaled_norm: bool = False):
        super().__init__()
        self.heads, self.cumsum, self.scaled_norm = heads, cumsum, scaled_norm
        D = 4 * heads
        self.emb = nn.Embedding(VOCAB, D)
        self.norm_w = nn.Parameter(torch.zeros(D))
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)

    def forward(self, ids_BS):
        x_BSD = self.emb(ids_BS)
        if self.cumsum:
            x_BSD = torch.cumsum(x_BSD, dim=1)  # mixes positions along the sequence: no rule
        if self.scaled_norm:
            x_BSD = x_BSD * (1.0 + self.norm_w.float())  # Gemma's RMSNorm scale
        B, S, D = x_BSD.shape
        q, k, v = (t.view(B, S, self.heads, 4).transpose(1, 2) for t in self.qkv(x_BSD).split(D, dim=-1))
        o_BNSH = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o_BNSH.transpose(1, 2).reshape(B, S, D))


def _ids(B, S, vocab=128, seed=0):
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


def _llama_call(B=2, S=17):
    ids = _ids(B, S)
    return dict(input_ids=ids, labels=ids, use_cache=False)


def _count(code: str, fn) -> int:
    return code.count(f"= autosp_collectives_{fn.__name__}(")


def _head_shards(gm):
    """The head-sharded q, k, v of every attention: the outputs of its one all-to-all, in order."""
    return [u for n in nodes_calling(gm, collectives.seq_to_head_many) for u in sorted(n.users, key=lambda u: u.args[1])]


def _sdpa(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


def _check_vals(gm) -> int:
    """Re-evaluate every tensor-valued call (under the graph's fake mode and the live fake group)
    and compare with its ``meta["val"]``; returns how many were checked."""
    fake_mode = fake_mode_of([n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"])
    checked = 0
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or n.target in SIDE_EFFECT_TARGETS:
            continue
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            continue
        again = fake_eval(n, fake_mode)
        assert (list(again.shape), again.dtype) == (list(v.shape), v.dtype), n.format_node()
        ev = n.meta.get("example_value")
        assert ev is None or list(ev.shape) == list(v.shape), f"example_value differs from val: {n.format_node()}"
        checked += 1
    return checked


def test_llama_two_ranks_odd_length():
    with fake_group(2):
        [(gm, plan, _)] = capture(tiny_llama(layers=2), **_llama_call(S=17), fused_loss=False)
        assert _check_vals(gm) > 100
    code = gm.code
    for fn, per_layer in ((collectives.seq_to_head_many, 1), (collectives.head_to_seq, 1)):
        assert _count(code, fn) == 2 * per_layer, fn.__name__
        assert len(nodes_calling(gm, fn)) == 2 * per_layer
    assert _count(code, collectives.all_reduce_sum) == 1  # the loss, once
    assert _count(code, collectives.gather_seq) == 0
    (FileCheck()
        .check("= autosp_collectives_shard_seq(").check("torch.nn.functional.embedding(")
        .check("= autosp_collectives_seq_to_head_many(").check("scaled_dot_product_attention(")
        .check("= autosp_collectives_head_to_seq(")
        .check("= autosp_collectives_seq_to_head_many(").check("scaled_dot_product_attention(")
        .check("= autosp_collectives_head_to_seq(")
        .check("reduction = 'sum'").check("= autosp_collectives_all_reduce_sum(")
        .run(code))
    assert plan.fallbacks == []
    assert [c.kind for c in plan.collectives] == ["all_to_all"] * 4 + ["all_reduce(sum)"]  # q, k, v in one

    [emb] = nodes_calling(gm, F.embedding)
    assert shape_of(emb) == [2, 9, 32]  # L = ceil(17 / 2)
    assert list(emb.meta["autosp.global_val"].shape) == [2, 17, 32]
    q, k, v = _head_shards(gm)[:3]
    assert shape_of(q) == [2, 2, 18, 8]  # 4 -> 2 heads, the padded sequence P * L = 18
    assert shape_of(k) == shape_of(v) == [2, 1, 18, 8]  # 2 KV heads cross at their own count
    assert all(shape_of(n) == [2, 2, 18, 8] for n in _sdpa(gm))
    assert all(shape_of(n) == [2, 4, 9, 8] for n in nodes_calling(gm, collectives.head_to_seq))
    assert plan.outputs[1].endswith("[2, 17, 128]: DTensor sharded on dim 1")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert shape_of(out.args[0][1]) == [2, 9, 128]  # rank 0: 9 real positions
    assert "KV sent at their own head count" in " ".join(plan.notes)


def test_llama_four_ranks_kv_heads_fewer_than_ranks():
    with fake_group(4):
        [(gm, plan, _)] = capture(tiny_llama(), **_llama_call(S=16))
        _check_vals(gm)
    [emb] = nodes_calling(gm, F.embedding)
    assert shape_of(emb) == [2, 4, 32]
    assert [shape_of(n) for n in _head_shards(gm)] == [[2, 1, 16, 8]] * 3
    assert plan.fallbacks == []
    assert "KV replicated x2 so each rank gets one" in " ".join(plan.notes)
    assert nodes_calling(gm, collectives.unshard_seq) == []  # 16 = 4 * 4: nothing to trim


def test_heads_not_divisible_by_ranks_are_padded():
    with fake_group(4):
        [(gm, plan, _)] = capture(Block(heads=6), _ids(2, 13, vocab=VOCAB))
        _check_vals(gm)
    assert "heads padded 6 -> 8 with zeros" in " ".join(plan.notes)
    assert plan.fallbacks == []
    assert [shape_of(n) for n in _head_shards(gm)] == [[2, 2, 16, 4]] * 3
    [h2s] = nodes_calling(gm, collectives.head_to_seq)
    assert shape_of(h2s) == [2, 8, 4, 4]
    [narrow] = [n for n in h2s.users if n.target is torch.narrow]
    assert shape_of(narrow) == [2, 6, 4, 4]  # the padding heads dropped


def test_op_without_rule_falls_back_to_a_gather():
    with fake_group(2):
        [(gm, plan, _)] = capture(Block(cumsum=True), _ids(2, 17, vocab=VOCAB))
        _check_vals(gm)
    [fallback] = plan.fallbacks
    assert "cumsum" in fallback.op and fallback.reason == "no layout rule for this op"
    assert [c.kind for c in plan.collectives].count("all_gather") == 1
    [cumsum] = [n for n in gm.graph.nodes if n.name == fallback.node]
    assert shape_of(cumsum) == [2, 17, 16]  # runs on the whole sequence
    FileCheck().check("= autosp_collectives_gather_seq(").check("= autosp_collectives_unshard_seq(") \
        .check("cumsum(").check("= autosp_collectives_shard_seq(").check("autosp_collectives_seq_to_head_many(").run(gm.code)


def test_new_nodes_keep_the_source_location():
    """Each node shard_sequence adds copies the stack trace of the model code it serves."""
    with fake_group(2):
        [(gm, _, _)] = capture(tiny_llama(), **_llama_call(S=17), disable_passes=["output_layout"])
    new = [n for n in gm.graph.nodes if n.target in AUTOSP_CALLS]
    assert len(new) > 5
    assert all(n.meta.get("stack_trace") for n in new), [n.name for n in new if not n.meta.get("stack_trace")]


def test_ranks_agree_on_the_plan_and_differ_only_in_their_slice():
    plans, graphs = [], []
    for rank in (0, 1):
        with fake_group(2, rank=rank):
            [(gm, plan, _)] = capture(tiny_llama(), **_llama_call(S=17))
        plans.append(plan)
        graphs.append(gm)
    assert plans[0].fingerprint() == plans[1].fingerprint()
    assert plans[0].digest() == plans[1].digest()
    for rank, gm in enumerate(graphs):
        assert {n.args[1] for n in nodes_calling(gm, collectives.shard_seq)} == {rank}
        out = next(n for n in gm.graph.nodes if n.op == "output")
        assert shape_of(out.args[0][1]) == [2, (9, 8)[rank], 128]  # rank 1 holds 8 real positions


def test_dynamic_sequence_length():
    call = _llama_call(S=17)
    torch._dynamo.mark_dynamic(call["input_ids"], 1)
    torch._dynamo.mark_dynamic(call["labels"], 1)
    with fake_group(2):
        [(gm, plan, _)] = capture(tiny_llama(), dynamic=None, **call)
        _check_vals(gm)
    assert plan.seq_len != "17" and plan.fallbacks == []
    assert _count(gm.code, collectives.seq_to_head_many) == 1 and _count(gm.code, collectives.head_to_seq) == 1
    [emb] = nodes_calling(gm, F.embedding)
    assert isinstance(emb.meta["val"].shape[1], torch.SymInt)


def test_a_parameter_of_length_S_is_never_cut():
    with fake_group(2):
        [(gm, plan, _)] = capture(Block(heads=4, scaled_norm=True), _ids(2, 16, vocab=VOCAB))  # D == S == 16
    param_names = {n.name for n in gm.graph.nodes if n.op == "placeholder" and n.meta["val"].requires_grad}
    assert [c.source for c in plan.cuts if c.source in param_names] == []
    assert plan.fallbacks == []
    assert [c.kind for c in plan.collectives].count("all_gather") == 0


def test_kv_cache_concat_with_an_empty_cache_needs_no_gather():
    """HF's DynamicCache (use_cache left on) does ``cat([empty, k], dim=-2)`` each layer: the
    empty part is dropped, so K and V go straight to the all-to-all, not through a gather."""
    ids = _ids(2, 16)
    with fake_group(2):
        [(gm, plan, _)] = capture(tiny_llama(layers=2), input_ids=ids, labels=ids)
        _check_vals(gm)
    assert plan.fallbacks == []
    assert _count(gm.code, collectives.gather_seq) == 0
    assert _count(gm.code, collectives.seq_to_head_many) == 2


def test_cat_along_the_sequence_of_two_shards_still_gathers():
    class Twice(Block):
        def forward(self, ids_BS):
            x_BSD = super().forward(ids_BS)
            return torch.cat([x_BSD, x_BSD], dim=1).sum()

    with fake_group(2):
        [(gm, plan, _)] = capture(Twice(), _ids(2, 16, vocab=VOCAB))
    assert [f.reason for f in plan.fallbacks] == ["cat along the sequence dim"]


class RepeatedKV(nn.Module):
    """4 query heads, 2 KV heads repeated by ``repeat_interleave`` (``form``: the tensor method or
    the function) before causal attention; ``along``: the embedding's rows repeated along that dim
    of ``[B, S, D]`` and summed back first."""

    def __init__(self, form: str = "method", along: int | None = None):
        super().__init__()
        self.form, self.along = form, along
        self.emb = nn.Embedding(VOCAB, 16)
        self.qkv = nn.Linear(16, 32)

    def forward(self, ids):
        x = self.emb(ids)
        B, S, _ = x.shape
        if self.along is not None:  # each row twice along that dim, then summed back: 2 x
            x = x.repeat_interleave(2, dim=self.along).view(B, S, 2, 16).sum(2) if self.along == 1 \
                else x.repeat_interleave(2, dim=self.along).view(B, S, 16, 2).sum(3)
        q, k, v = self.qkv(x).split([16, 8, 8], dim=-1)
        q = q.view(B, S, 4, 4).transpose(1, 2)
        k, v = (t.view(B, S, 2, 4).transpose(1, 2) for t in (k, v))
        if self.form == "method":
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        else:
            k, v = torch.repeat_interleave(k, 2, dim=-3), torch.repeat_interleave(v, repeats=2, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, 16)


def test_a_models_repeat_interleave_of_kv_heads_moves_after_the_all_to_all():
    """``repeat_interleave`` over the head dim keeps the sequence layout, and the model's repeat is
    read like HF's repeat_kv: KV cross the all-to-all at their own head count, no gather."""
    for form in ("method", "function"):
        with fake_group(2):
            [(gm, plan, _)] = capture(RepeatedKV(form), _ids(2, 17, vocab=VOCAB))
            _check_vals(gm)
        assert not plan.fallbacks, (form, plan.fallbacks)
        assert any("2 KV heads (the model's repeat x2 moved after the all-to-all): KV sent at their own head count"
                   in n for n in plan.notes), (form, plan.notes)
        assert not nodes_calling(gm, collectives.gather_seq)


def test_repeat_interleave_along_the_sequence_falls_back():
    with fake_group(2):
        [(gm, plan, _)] = capture(RepeatedKV(along=1), _ids(2, 9, vocab=VOCAB))
        _check_vals(gm)
    [fallback] = plan.fallbacks
    assert fallback.op == "Tensor.repeat_interleave" and "along the sequence" in fallback.reason
    with fake_group(2):  # along the hidden dim: the layout is kept
        [(_, plan, _)] = capture(RepeatedKV(along=2), _ids(2, 9, vocab=VOCAB))
    assert not plan.fallbacks


class PickedKV(nn.Module):
    """Falcon's layout: fused q/k/v ``[B, S, G, k + 2, H]``, K and V picked by a list index and
    broadcast to the query heads; ``on_sequence``: a list index along the sequence as well."""

    def __init__(self, on_sequence: bool = False):
        super().__init__()
        self.on_sequence = on_sequence
        self.emb = nn.Embedding(VOCAB, 16)
        self.qkv = nn.Linear(16, 32)  # 2 groups x (2 query heads + K + V) x 4

    def forward(self, ids):
        x = self.emb(ids)
        B, S, _ = x.shape
        if self.on_sequence:
            x = x[:, [0] * S]  # every position reads the first: not a shard of the result
        qkv = self.qkv(x).view(B, S, 2, 4, 4)
        q, k, v = qkv[:, :, :, :-2], qkv[:, :, :, [-2]], qkv[:, :, :, [-1]]
        k, v = torch.broadcast_to(k, q.shape), torch.broadcast_to(v, q.shape)
        q, k, v = (t.flatten(2, 3).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, 16)


def test_a_list_index_off_the_sequence_and_broadcast_to_keep_the_shard():
    with fake_group(2):
        [(gm, plan, _)] = capture(PickedKV(), _ids(2, 17, vocab=VOCAB))
        _check_vals(gm)
    assert not plan.fallbacks and not nodes_calling(gm, collectives.gather_seq)
    targets = [n.args[1] for n in gm.graph.nodes if n.target is torch.broadcast_to]
    assert targets == [(2, -1, 2, 2, 4)] * 2  # the sequence's size left to the shard
    with fake_group(2):
        [(gm, plan, _)] = capture(PickedKV(on_sequence=True), _ids(2, 17, vocab=VOCAB))
        _check_vals(gm)
    assert [f.reason for f in plan.fallbacks] == ["indexing picks part of the sequence"]


class MinMax(nn.Module):
    """xIELU's elementwise ``torch.min(x, eps)`` and ``expm1``; ``over_sequence``: a max over the
    sequence as well (values and indices)."""

    def __init__(self, over_sequence: bool = False):
        super().__init__()
        self.over_sequence = over_sequence
        self.emb = nn.Embedding(VOCAB, 16)
        self.eps = nn.Parameter(torch.tensor(-1e-6))

    def forward(self, ids):
        x = self.emb(ids)
        B, S, _ = x.shape
        x = torch.expm1(torch.min(x, self.eps)) + x.max(torch.zeros_like(x))
        h = x.view(B, S, 4, 4).transpose(1, 2)  # attention, so that the region is sharded
        x = F.scaled_dot_product_attention(h, h, h, is_causal=True).transpose(1, 2).reshape(B, S, 16)
        return torch.max(x, dim=1).values if self.over_sequence else x


def test_elementwise_min_max_keep_the_shard_and_a_max_over_the_sequence_falls_back():
    with fake_group(2):
        [(gm, plan, _)] = capture(MinMax(), _ids(2, 17, vocab=VOCAB))
        _check_vals(gm)
    assert plan.active and not plan.fallbacks
    with fake_group(2):
        [(gm, plan, _)] = capture(MinMax(over_sequence=True), _ids(2, 17, vocab=VOCAB))
        _check_vals(gm)
    assert [f.reason for f in plan.fallbacks] == ["min/max over a dim (values and indices): no layout rule"]


def test_rotary_angles_from_the_positions_need_no_gather():
    """transformers <= 5.17 makes rotary angles as ``inv_freq [B, H/2, 1] @ positions [B, 1, S]``:
    the positions cast to float stay whole (every rank holds them), the matmul runs on whole
    values and its float result is cut where its work starts: no gather, no fallback."""
    from tests.distributed.models import PlainLM

    with fake_group(2):
        [(gm, plan, _)] = capture(PlainLM(dim=32, heads=4, rope=True), _ids(2, 17, vocab=96))
    assert plan.fallbacks == []
    assert nodes_calling(gm, collectives.gather_seq) == []
    [mm] = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.matmul, torch.matmul)]
    assert shape_of(mm) == [2, 4, 17]  # [B, H/2, S]: whole
    assert any("before Tensor.cos" in c.detail for c in plan.cuts)
