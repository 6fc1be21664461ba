"""find_attention: which SDPA calls are self-attention over the sequence, and S.

Legend: B batch, S sequence, M memory (encoder) length, D hidden, N heads, H head dim.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autosp import collectives
from autosp.passes._attention import SDPA_TARGETS
from autosp.passes._context import SITE
from autosp.pipeline import PASS_NAMES
from tests.harness_fake import capture, trace_plan
from tests.passes.models_tiny import tiny_llama

VOCAB, D, N = 64, 16, 4


class Attention(nn.Module):
    """Causal self-attention; with ``memory``, cross-attention from the sequence to the memory."""

    def __init__(self, self_attention: bool = True):
        super().__init__()
        self.self_attention = self_attention
        self.emb = nn.Embedding(VOCAB, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.kv_mem = nn.Linear(D, 2 * D)

    def forward(self, ids_BS, memory_BM=None):
        x_BSD = self.emb(ids_BS)
        B, S, _ = x_BSD.shape
        q, k, v = self.qkv(x_BSD).split(D, dim=-1)
        q_BNSH = q.view(B, S, N, -1).transpose(1, 2)
        if self.self_attention:
            k_BNSH, v_BNSH = (t.view(B, S, N, -1).transpose(1, 2) for t in (k, v))
            o_BNSH = F.scaled_dot_product_attention(q_BNSH, k_BNSH, v_BNSH, is_causal=True)
            x_BSD = x_BSD + o_BNSH.transpose(1, 2).reshape(B, S, D)
            q_BNSH = x_BSD.view(B, S, N, -1).transpose(1, 2)
        if memory_BM is not None:
            M = memory_BM.shape[1]
            k, v = self.kv_mem(self.emb(memory_BM)).split(D, dim=-1)
            k_BNMH, v_BNMH = (t.view(B, M, N, -1).transpose(1, 2) for t in (k, v))
            o_BNSH = F.scaled_dot_product_attention(q_BNSH, k_BNMH, v_BNMH)
            x_BSD = x_BSD + o_BNSH.transpose(1, 2).reshape(B, S, D)
        return x_BSD.pow(2).sum()


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, VOCAB))

    def forward(self, ids_BS, labels_BS):
        logits_BSV = self.mlp(self.emb(ids_BS))
        return F.cross_entropy(logits_BSV.view(-1, VOCAB), labels_BS.view(-1))


def _ids(*shape, vocab=VOCAB, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


def _unchanged(plan) -> bool:
    """The sequence-parallel passes changed nothing (causal_mask, fused_loss and grouped_kv pay on any group)."""
    return all(before == after for name, before, after in plan.passes if name not in ("causal_mask", "fused_loss", "grouped_kv"))


def _autosp_calls(gm):
    return [n for n in gm.graph.nodes if getattr(n.target, "__module__", None) == collectives.__name__]


def test_self_attention_is_rewritten_on_two_ranks():
    ids = _ids(2, 17, vocab=128)
    [(gm, plan, _)] = capture(tiny_llama(), input_ids=ids, labels=ids, use_cache=False, world=2)
    [site] = plan.sites
    assert (site.kind, site.rewritten) == ("self-attention", True)
    assert "q [2, 4, 17, 8]" in site.detail and "k [2, 4, 17, 8]" in site.detail
    assert plan.active and plan.world == 2 and plan.seq_len == "17"
    [sdpa] = _sdpa_nodes(gm)
    assert sdpa.meta[SITE]["rewrite"] is True


def test_one_rank_rewrites_nothing_and_leaves_the_graph_as_it_was():
    model = tiny_llama()
    ids = _ids(2, 17, vocab=128)
    labels = ids.clone()
    labels[:, :5] = -100
    # no process group; the fused loss reorders the loss's sums, so it is off for a bitwise comparison
    [(gm, plan, inputs)] = capture(model, input_ids=ids, labels=labels, use_cache=False, fused_loss=False)
    [site] = plan.sites
    assert not site.rewritten and "group of size 1" in site.kind
    assert plan.world == 1 and not plan.active and plan.seq_len is None
    assert [name for name, _, _ in plan.passes] == list(PASS_NAMES)  # every pass ran
    assert _unchanged(plan)
    assert _autosp_calls(gm) == []
    with torch.no_grad():
        loss, logits = gm(*inputs)
        want = model(input_ids=ids, labels=labels, use_cache=False)
    torch.testing.assert_close(loss, want.loss, rtol=0, atol=0)
    torch.testing.assert_close(logits, want.logits, rtol=0, atol=0)


def test_cross_attention_alone_is_left_alone_and_reported():
    report = trace_plan(Attention(self_attention=False), _ids(2, 17), _ids(2, 9, seed=1), world=2)
    [plan] = report.plans
    [site] = plan.sites
    assert not site.rewritten and site.kind.startswith("cross-attention")
    assert "q [2, 4, 17, 4]" in site.detail and "k [2, 4, 9, 4]" in site.detail
    assert not plan.active and plan.seq_len is None
    assert plan.collectives == [] and plan.cuts == [] and plan.fallbacks == []
    assert _unchanged(plan)
    assert "cross-attention (query and key lengths differ): left alone" in str(report)
    assert "-> left alone" in str(report)


def test_cross_attention_beside_self_attention():
    """The self-attention is rewritten; the cross-attention runs on the whole sequence after a gather."""
    [(gm, plan, _)] = capture(Attention(), _ids(2, 17), _ids(2, 9, seed=1), world=2)
    self_site, cross_site = plan.sites
    assert (self_site.kind, self_site.rewritten) == ("self-attention", True)
    assert cross_site.kind.startswith("cross-attention") and not cross_site.rewritten
    assert plan.seq_len == "17"
    self_sdpa, cross_sdpa = _sdpa_nodes(gm)
    assert cross_sdpa.meta[SITE]["rewrite"] is False
    assert [f.node for f in plan.fallbacks] == [cross_sdpa.name]
    assert [c.kind for c in plan.collectives].count("all_gather") == 1
    q_BNSH, k_BNMH, _ = cross_sdpa.args[:3]
    assert list(q_BNSH.meta["val"].shape) == [2, 4, 17, 4]  # the query gathered to full length
    assert list(k_BNMH.meta["val"].shape) == [2, 4, 9, 4]  # the memory never sharded
    assert list(self_sdpa.meta["val"].shape) == [2, 2, 18, 4]  # 2 of 4 heads, padded 2 * 9 positions


def test_attention_over_another_length_is_left_alone():
    """Two self-attentions over different lengths: the first fixes S, the second is not sharded."""

    def two_lengths(a_BNSH, b_BNTH):
        o = F.scaled_dot_product_attention(a_BNSH, a_BNSH, a_BNSH, is_causal=True)
        p = F.scaled_dot_product_attention(b_BNTH, b_BNTH, b_BNTH)
        return o.sum() + p.sum()

    [plan] = trace_plan(two_lengths, torch.randn(1, 2, 17, 4), torch.randn(1, 2, 6, 4), world=2).plans
    first, second = plan.sites
    assert first.rewritten and first.kind == "self-attention"
    assert not second.rewritten and second.kind == "attention over another length than S=17: left alone"


def test_model_without_attention_runs_unchanged():
    model = NoAttention()
    ids = _ids(2, 17)
    [(gm, plan, inputs)] = capture(model, ids, ids, world=2)
    assert plan.sites == [] and not plan.active
    assert plan.notes == ["no attention found: the region runs unchanged on every rank (full sequence)"]
    assert plan.cuts == [] and plan.collectives == [] and plan.inputs == []
    assert _unchanged(plan)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs)[0], model(ids, ids), rtol=0, atol=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_training_with_a_returned_kv_cache_is_noted(tmp_path, use_cache):
    import autosp

    ids = torch.randint(0, 128, (1, 32))
    compiled = torch.compile(tiny_llama(layers=2), backend=autosp.backend(compiler="aot_eager", dump_dir=str(tmp_path)))
    compiled(input_ids=ids, labels=ids, use_cache=use_cache).loss.backward()
    [text] = [p.read_text() for p in tmp_path.glob("*.txt")]
    assert ("returns 4 keys/values its attention uses" in text) == use_cache
