"""global_loss: a mean cross-entropy becomes sum / count of valid targets, exact on one device.

The graphs are traced as rank 0 of a fake group of 2 (so the pass has a region to work on) with
``shard_sequence`` and ``output_layout`` switched off: the rewritten graph then holds no
collective and computes on the whole sequence, as one device would, and can be run as it is.

Legend: B batch, S sequence, D hidden, N heads, V vocab.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import FileCheck

from tests.harness_fake import capture
from tests.passes.models_tiny import tiny_llama

V, D, N = 64, 16, 4
ONLY_GLOBAL_LOSS = {"disable_passes": ["shard_sequence", "output_layout", "fused_loss"]}
NOTE = "mean cross-entropy as a global sum over the count of valid targets"


class LM(nn.Module):
    """Embedding, causal attention, a head and a cross-entropy with the given keyword arguments."""

    def __init__(self, **loss_kwargs):
        super().__init__()
        self.loss_kwargs = loss_kwargs
        self.emb = nn.Embedding(V, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.head = nn.Linear(D, V)

    def forward(self, ids_BS, labels_BS):
        x_BSD = self.emb(ids_BS)
        B, S, _ = x_BSD.shape
        q, k, v = (t.view(B, S, N, -1).transpose(1, 2) for t in self.qkv(x_BSD).split(D, dim=-1))
        o_BNSH = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        logits_BSV = self.head(x_BSD + o_BNSH.transpose(1, 2).reshape(B, S, D))
        return F.cross_entropy(logits_BSV.view(-1, V), labels_BS.view(-1), **self.loss_kwargs)


def _batch(B=2, S=17, vocab=V, ignore=-100):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    labels = torch.randint(0, vocab, (B, S), generator=g)
    labels[0, 2:9] = ignore  # ranks hold different numbers of valid tokens
    labels[1, -3:] = ignore
    return ids, labels


def _run(gm, inputs):
    with torch.no_grad():
        out = gm(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def test_mean_becomes_sum_over_count_of_valid_targets():
    ids, labels = _batch()
    [(gm, plan, _)] = capture(LM(reduction="mean"), ids, labels, options=ONLY_GLOBAL_LOSS, world=2)
    before = dict((name, code) for name, code, _ in plan.passes)["global_loss"]
    FileCheck().check_count("torch.nn.functional.cross_entropy(", 1, exactly=True).check("reduction = 'mean'").run(before)
    (FileCheck()
        .check_count("torch.nn.functional.cross_entropy(", 1, exactly=True)
        .check("reduction = 'sum'")
        .check("torch.ne(").check(", -100)")
        .check("torch.sum(")
        .check(" / ")
        .check("return")
        .run(gm.code))
    FileCheck().check_not("'mean'").run(gm.code)
    [note] = [n for n in plan.notes if NOTE in n]
    assert note.startswith("truediv")  # names the node that now holds the loss
    assert "pass shard_sequence is disabled" in plan.notes and "pass output_layout is disabled" in plan.notes


@pytest.mark.parametrize(
    "loss_kwargs",
    [{}, {"reduction": "mean"}, {"ignore_index": 3}, {"label_smoothing": 0.1}],
    ids=["default", "mean", "ignore_index=3", "label_smoothing"],
)
def test_one_device_value_is_the_mean(loss_kwargs):
    ignore = loss_kwargs.get("ignore_index", -100)
    ids, labels = _batch(ignore=ignore)
    model = LM(**loss_kwargs)
    [(gm, plan, inputs)] = capture(model, ids, labels, options=ONLY_GLOBAL_LOSS, world=2)
    assert any(NOTE in n for n in plan.notes)
    with torch.no_grad():
        want = model(ids, labels)
    assert torch.isfinite(want)
    torch.testing.assert_close(_run(gm, inputs), want, rtol=1e-6, atol=1e-6)


def test_llama_loss_with_ignored_labels_on_one_device():
    model = tiny_llama()
    ids, labels = _batch(vocab=128)
    [(gm, plan, inputs)] = capture(model, input_ids=ids, labels=labels, use_cache=False, options=ONLY_GLOBAL_LOSS, world=2)
    FileCheck().check("reduction = 'sum'").check_not("'mean'").run(gm.code)
    with torch.no_grad():
        want = model(input_ids=ids, labels=labels, use_cache=False).loss
        # the shifted labels by hand: the model's loss is the plain mean over valid targets
        logits = model(input_ids=ids, use_cache=False).logits
        by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(want, by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_run(gm, inputs), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss_kwargs", [{"reduction": "sum"}, {"reduction": "none"}, {"weight": "w"}],
                         ids=["sum", "none", "weighted"])
def test_other_losses_are_left_alone(loss_kwargs):
    """A sum is already global; a class-weighted mean divides by the weights, not the count."""
    if loss_kwargs.get("weight") == "w":
        loss_kwargs = {"weight": torch.rand(V, generator=torch.Generator().manual_seed(1))}
    ids, labels = _batch()
    model = LM(**loss_kwargs)
    [(gm, plan, inputs)] = capture(model, ids, labels, options=ONLY_GLOBAL_LOSS, world=2)
    global_loss = dict((name, (b, a)) for name, b, a in plan.passes)["global_loss"]
    assert global_loss[0] == global_loss[1]
    assert not any(NOTE in n for n in plan.notes)
    with torch.no_grad():
        torch.testing.assert_close(_run(gm, inputs), model(ids, labels), rtol=0, atol=0)


def test_a_weighted_mean_falls_back_when_sharded():
    """Left alone by global_loss, a class-weighted mean over a sharded sequence must not be guessed."""
    ids, labels = _batch()
    model = LM(weight=torch.rand(V, generator=torch.Generator().manual_seed(1)))
    [(gm, plan, _)] = capture(model, ids, labels, world=2)
    [fallback] = plan.fallbacks
    assert fallback.op == "torch.nn.functional.cross_entropy" and "'mean'" in fallback.reason
    assert not any(NOTE in n for n in plan.notes)


def test_one_rank_leaves_the_mean():
    ids, labels = _batch()
    [(gm, plan, _)] = capture(LM(reduction="mean"), ids, labels)  # no process group
    FileCheck().check("reduction = 'mean'").check_not("reduction = 'sum'").run(gm.code)
    assert not any(NOTE in n for n in plan.notes)


def test_full_pipeline_keeps_the_sum_partial_and_reduces_once():
    ids, labels = _batch()
    [(gm, plan, _)] = capture(LM(), ids, labels, world=2)
    (FileCheck()
        .check("reduction = 'sum'")
        .check(" / ")
        .check_count("= autosp_collectives_all_reduce_sum(", 1, exactly=True)
        .check("return")
        .run(gm.code))
    assert [c.kind for c in plan.collectives].count("all_reduce(sum)") == 1
    assert plan.fallbacks == []
