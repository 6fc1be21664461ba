"""The routing region (passes/_token_routing.py): a MoE's tokens sorted by expert, worked on row by
row and put back run on each rank's own tokens; top-k, gather and scatter along a dim that is not
the sequence's keep the layout; an in-place op with no rule writes back into its sharded target.
Numbers: the gloo parity cases qwen3_moe, deepseek_v3 and plain_write (tests/distributed)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn

from tests.harness_fake import capture, nodes_calling, shape_of


def _ids(B=1, S=32, vocab=96):
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(0))


def test_transformers_grouped_experts_run_on_this_ranks_pairs_with_no_gather():
    from tests.distributed.models import build

    ids = _ids()
    [(gm, plan, _)] = capture(build("qwen3_moe"), input_ids=ids, labels=ids, use_cache=False, world=2)
    assert plan.fallbacks == []
    assert [c for c in plan.collectives if c.kind == "all_gather"] == []
    routed = [n for n in plan.notes if "tokens routed by a sort" in n]
    assert len(routed) == 2 and all("of 64 token-expert pairs run on this rank's 32 pairs" in n for n in routed)
    sorts = nodes_calling(gm, torch.sort)
    assert [shape_of(n.args[0]) for n in sorts] == [[32], [32]]  # 16 local tokens x 2 experts each
    written = [n for n in nodes_calling(gm, torch.arange) if any(u.target is operator.setitem for u in n.users)]
    assert [n.args for n in written] == [(32,), (32,)]  # inv[perm] = arange(pairs): this rank's pairs


def test_the_group_limited_router_picks_experts_on_local_tokens():
    """DeepSeek-V3's router: topk over groups, scatter_ of the chosen groups into a mask, the
    weights gathered from the scores by the picked ids: all along the expert dim."""
    from tests.distributed.models import build

    ids = _ids(2, 17)
    [(_, plan, _)] = capture(build("deepseek_v3"), input_ids=ids, labels=ids, use_cache=False, world=2)
    ops = {f.op for f in plan.fallbacks}
    assert not ops & {"topk", "Tensor.topk", "Tensor.gather", "Tensor.scatter_", "sort", "operator.getitem"}, ops
    assert any("tokens routed by a sort of 68 token-expert pairs run on this rank's 36 pairs" in n for n in plan.notes)


def _attend(x_BSD):
    """One causal attention head over x (autosp shards the sequence where attention is)."""
    x_B1SD = x_BSD.unsqueeze(1)
    return torch.nn.functional.scaled_dot_product_attention(x_B1SD, x_B1SD, x_B1SD, is_causal=True).squeeze(1)


class _Routed(nn.Module):
    """A routing region written out: each token's k experts, pairs sorted by expert, a per-pair
    weight picked by the permutation, put back by the inverse permutation. ``leak`` adds a
    reader the region cannot run locally."""

    def __init__(self, leak: str = "", experts: int = 4, k: int = 2, dim: int = 8):
        super().__init__()
        self.leak, self.experts, self.k = leak, experts, k
        self.router = nn.Linear(dim, experts, bias=False)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, experts))

    def forward(self, x_BSD):
        B, S, D = x_BSD.shape
        x_BSD = _attend(x_BSD)
        h = x_BSD.reshape(-1, D)
        top_w, top_i = torch.topk(self.router(h).softmax(-1), self.k, dim=-1)
        ids = top_i.reshape(-1)
        ids_g, perm = torch.sort(ids)
        past = (ids_g >= self.experts).unsqueeze(-1)  # transformers <= 5.17: rows past the experts zeroed,
        ids_g.clamp_(max=self.experts - 1)  # the sorted ids clamped in place
        rows = h[perm // self.k] * self.scale[ids_g].unsqueeze(-1) * top_w.reshape(-1)[perm].unsqueeze(-1)
        rows.masked_fill_(past, 0.0)
        extra = 0.0
        if self.leak == "counts":  # a router statistic over the sorted ids: global, not per rank
            extra = torch.histc(ids_g.float(), bins=self.experts, min=0, max=self.experts - 1).max()
        if self.leak == "rows_sum":  # a reduction over the rows inside the region
            rows = rows - rows.mean(0)
        if self.leak == "perm_math":  # the permutation read as a number
            rows = rows * (perm + 1).unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        out = rows[inv].view(B * S, self.k, D).sum(1).view(B, S, D)
        return out + extra


def test_a_written_out_routing_region_is_local():
    x = torch.randn(2, 16, 8)
    [(gm, plan, _)] = capture(_Routed(), x, world=2)
    assert plan.fallbacks == []
    assert any("tokens routed by a sort of 64 token-expert pairs run on this rank's 32 pairs" in n for n in plan.notes)
    assert shape_of(next(iter(nodes_calling(gm, torch.sort))).args[0]) == [32]


@pytest.mark.parametrize("leak, reader", [("counts", "histc"), ("rows_sum", "mean"), ("perm_math", "add")])
def test_a_region_read_other_than_row_by_row_takes_the_fallback(leak, reader):
    x = torch.randn(2, 16, 8)
    [(_, plan, _)] = capture(_Routed(leak), x, world=2)
    sort = [f for f in plan.fallbacks if "sort along the sequence" in f.reason]
    assert len(sort) == 1, plan.fallbacks
    assert reader in sort[0].reason and "is not row by row" in sort[0].reason
    assert not any("tokens routed by a sort" in n for n in plan.notes)


def test_topk_along_the_sequence_is_a_fallback_and_along_another_dim_is_not():
    def along(x_BSD, dim):
        return torch.topk(_attend(x_BSD), 2, dim=dim).values.sum()

    x = torch.randn(2, 16, 8)
    [(_, plan, _)] = capture(lambda x: along(x, -1), x, world=2)
    assert plan.fallbacks == []
    [(_, plan, _)] = capture(lambda x: along(x, 1), x, world=2)
    assert [f.reason for f in plan.fallbacks if f.op.endswith("topk")] == ["topk along the sequence"]


def test_an_in_place_write_with_no_rule_is_written_back_into_the_shard():
    """``x[:, 0] = 0`` on a sharded value used to be skipped by the sweep (its value is None) and
    ran on each rank's own position 0: now it runs on a clone of the gathered value and this
    rank's shard of the clone is copied back (numbers: the gloo parity case plain_write)."""
    from tests.distributed.models import build

    ids = _ids(2, 17)
    [(gm, plan, _)] = capture(build("plain_write"), input_ids=ids, labels=ids, world=2)
    [fallback] = [f for f in plan.fallbacks if f.node.startswith("setitem")]
    setitem = next(n for n in gm.graph.nodes if n.target is operator.setitem)
    assert setitem.args[0].target == "clone"  # written into a clone of the whole value
    back = [n for n in gm.graph.nodes if n.target == "copy_"]
    assert len(back) == 1 and back[0].args[0] is nodes_calling(gm, torch.nn.functional.embedding)[0]
    order = list(gm.graph.nodes)
    assert order.index(back[0]) > order.index(setitem)
    assert shape_of(back[0]) == [2, 9, 28]  # this rank's shard, padded 17 -> 18


def test_a_whole_value_written_from_a_sharded_one_is_written_whole():
    """``acc.add_(a)`` with ``acc`` whole and ``a`` sharded: the pointwise rule would cut ``acc``,
    so the write landed in the cut copy and ``acc`` stayed zeros. Now ``a`` is gathered and the
    write goes into ``acc`` itself (a fallback, in the plan)."""

    def f(x):
        B, S, D = x.shape
        acc = torch.zeros(B, S, D)
        acc.add_(_attend(x))
        return (acc * 2).sum()

    [(gm, plan, _)] = capture(f, torch.randn(2, 16, 8), world=2)
    assert [(f.op, f.reason) for f in plan.fallbacks] == [("Tensor.add_", "writes a sharded value into a whole one in place")]
    add = next(n for n in gm.graph.nodes if n.target == "add_")
    assert add.args[0].target is torch.zeros  # into acc itself, not into a cut of it
    assert shape_of(add.args[1]) == [2, 16, 8]  # the attention output gathered whole


def test_a_write_through_a_view_makes_the_whole_copy_of_its_base_stale():
    """A gathered copy of ``a`` is cached for the ops that need ``a`` whole; a write into a view
    of ``a`` makes it stale, so the next op that needs ``a`` whole gathers it again."""

    def f(x):
        a = _attend(x)
        before = torch.cumsum(a, dim=1)  # along the sequence: a fallback, ``a`` gathered
        a.view(-1).add_(1.0)  # a local write, through a view
        after = torch.cumsum(a, dim=1)  # must see the write
        return (before + after).sum()

    from autosp import collectives

    [(gm, _, _)] = capture(f, torch.randn(2, 16, 8), world=2)
    gathers = nodes_calling(gm, collectives.gather_seq)
    add = next(n for n in gm.graph.nodes if n.target == "add_")
    order = list(gm.graph.nodes)
    assert len([g for g in gathers if g.args[0] is gathers[0].args[0]]) == 2  # ``a`` gathered twice
    assert order.index(gathers[0]) < order.index(add) < order.index(gathers[1])
