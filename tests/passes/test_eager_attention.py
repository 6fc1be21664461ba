"""eager_attention: attention spelled out as matmul, softmax, matmul runs as one SDPA call, and is
then an attention site like any other (causal mask proven, sharded between all-to-alls)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import FileCheck

import autosp
from autosp.kernels.document_attention import DOCUMENT_ATTENTION
from tests.harness_fake import capture, fake_group, trace_plan
from tests.passes.models_tiny import tiny_llama


def _eager_llama():
    model = tiny_llama(layers=2)
    model.config._attn_implementation = "eager"
    return model


def _call(S=17, B=2):
    ids = torch.randint(0, 128, (B, S), generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, labels=ids, use_cache=False)


def test_hf_eager_attention_is_sharded_like_sdpa_on_two_ranks():
    with fake_group(2):
        [(gm, plan, _)] = capture(_eager_llama(), **_call(), fused_loss=False)
    assert [s.rewritten for s in plan.sites] == [True, True]
    assert all("causal" in s.detail for s in plan.sites)  # transformers' where(mask, 0, min) proven causal
    assert plan.fallbacks == []
    FileCheck().check_count("seq_to_head_many(", 2, exactly=True).run(gm.code)
    assert "softmax" not in gm.code  # the [B, H, S, S] scores are never built
    assert any("eager attention: 2 matmul-softmax-matmul chains run as SDPA calls" in n for n in plan.notes)


def test_packed_documents_and_a_window_through_the_additive_mask_run_as_document_attention():
    """transformers' eager mask is where(mask, 0, finfo.min) over the boolean it builds for sdpa:
    it stays whole (no cut of a float made of a boolean and scalars), and document_mask proves
    it through its boolean as it does the sdpa mask."""
    from tests.distributed.models import build

    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(8).repeat(2).expand(2, 16)  # two documents of 8 in each row
    report = trace_plan(build("qwen2_sw_eager"), input_ids=ids, labels=ids, position_ids=positions,
                        use_cache=False, world=2)
    text = str(report)
    assert "attention masked to causal within documents:" in text
    assert "attention masked to causal within documents and a sliding window of 5:" in text
    assert "keeps its mask" not in text


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_step_equals_the_eager_model_on_one_process(kind):
    torch.manual_seed(0)
    if kind == "llama":
        model = _eager_llama()
    else:
        import transformers as tf

        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                                 embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager"))
    ref = copy.deepcopy(model)
    call = _call()
    report = autosp.explain(model, **call)
    assert any("eager attention: 2 matmul-softmax-matmul chains" in n for p in report.plans for n in p.notes)
    torch._dynamo.reset()
    out = torch.compile(model, backend=autosp.backend(compiler="aot_eager"))(**call)
    out.loss.backward()
    expect = ref(**call)
    expect.loss.backward()
    torch.testing.assert_close(out.loss, expect.loss, rtol=1e-6, atol=0)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


class _Attention(nn.Module):
    """One head group's attention spelled out, with knobs for what the pass must refuse."""

    def __init__(self, returns_weights=False, dropout=0.0, softmax_dim=-1, mask_first=False, scale="mul"):
        super().__init__()
        self.returns_weights, self.dropout, self.softmax_dim = returns_weights, dropout, softmax_dim
        self.mask_first, self.scale = mask_first, scale

    def forward(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(-1, -2))
        if self.mask_first:
            scores = (scores + mask) * 0.5
        elif self.scale == "mul":
            scores = scores * 0.5 + mask
        else:  # "div"
            scores = mask + scores / math.sqrt(q.shape[-1])
        w = F.softmax(scores, dim=self.softmax_dim)
        w = F.dropout(w, p=self.dropout, training=self.training)
        out = torch.matmul(w, v)
        return (out, w) if self.returns_weights else out


def _qkv_mask():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 11, 8, generator=g) for _ in range(3))
    mask = torch.randn(2, 1, 11, 11, generator=g)
    return q, k, v, mask


@pytest.mark.parametrize("scale", ["mul", "div"])
def test_a_scale_and_an_additive_mask_go_to_sdpa_exactly(scale):
    module = _Attention(scale=scale).eval()
    inputs = _qkv_mask()
    report = trace_plan(module, *inputs, world=1)
    assert any("eager attention: 1 matmul-softmax-matmul chains run as SDPA calls" in n
               for p in report.plans for n in p.notes)
    torch._dynamo.reset()
    got = torch.compile(module, backend=autosp.backend(compiler="aot_eager"))(*inputs)
    torch.testing.assert_close(got, module(*inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("knobs,reason", [
    (dict(returns_weights=True), "its attention weights or scores are read elsewhere"),
    (dict(dropout=0.1), "dropout p=0.1 in training"),
    (dict(softmax_dim=-2), "the softmax runs over dim -2, not the keys"),
])
def test_what_sdpa_does_not_compute_is_left_as_written_with_a_reason(knobs, reason):
    module = _Attention(**knobs).train()
    report = trace_plan(module, *_qkv_mask(), world=1)
    notes = [n for p in report.plans for n in p.notes]
    assert any("left as written: " + reason in n for n in notes), notes
    assert not any("run as SDPA calls" in n for n in notes)


def test_a_learned_mask_is_left_as_written():
    module = _Attention().eval()
    q, k, v, mask = _qkv_mask()
    report = trace_plan(module, q, k, v, mask.requires_grad_(), world=1)
    notes = [n for p in report.plans for n in p.notes]
    assert any("left as written: its mask is learned" in n for n in notes), notes


def test_a_mask_added_before_the_scale_is_no_attention_chain():
    report = trace_plan(_Attention(mask_first=True).eval(), *_qkv_mask(), world=1)
    notes = [n for p in report.plans for n in p.notes]
    assert not any("eager attention" in n for n in notes), notes


class _Softcapped(nn.Module):
    """Gemma 2's chain: scale, ``tanh(w / c) * c``, mask, softmax; ``form`` spells the cap otherwise."""

    def __init__(self, cap=0.7, form="gemma2"):
        super().__init__()
        self.cap, self.form = cap, form

    def forward(self, q, k, v, mask):
        w = torch.matmul(q, k.transpose(2, 3)) * 0.35
        if self.form == "gemma2":
            w = torch.tanh(w / self.cap) * self.cap
        elif self.form == "reciprocal":  # x * (1 / c), the cap's factor first
            w = self.cap * (w * (1.0 / self.cap)).tanh()
        else:  # "caps differ": tanh(w / c) * 2c bounds nothing SDPA-like: no attention chain
            w = torch.tanh(w / self.cap) * (2 * self.cap)
        w = F.softmax(w + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v)


@pytest.mark.parametrize("form", ["gemma2", "reciprocal"])
def test_a_logit_softcap_runs_as_softcap_attention_exactly(form):
    module = _Softcapped(form=form).eval()
    inputs = _qkv_mask()
    report = trace_plan(module, *inputs, world=1)
    notes = [n for p in report.plans for n in p.notes]
    assert any("1 of them bound their scores (a logit softcap" in n for n in notes), notes
    [(gm, _, _)] = capture(module, *inputs)
    calls = [n for n in gm.graph.nodes if n.target is autosp.kernels.softcap_attention.softcap_attention]
    assert len(calls) == 1 and calls[0].kwargs["softcap"] == pytest.approx(0.7), gm.code
    assert calls[0].kwargs["scale"] == pytest.approx(0.35)
    torch._dynamo.reset()
    got = torch.compile(module, backend=autosp.backend(compiler="aot_eager"))(*inputs)
    torch.testing.assert_close(got, module(*inputs), rtol=1e-5, atol=1e-6)


def test_a_bound_with_two_different_caps_is_no_attention_chain():
    report = trace_plan(_Softcapped(form="caps differ").eval(), *_qkv_mask(), world=1)
    notes = [n for p in report.plans for n in p.notes]
    assert not any("eager attention" in n for n in notes), notes


def test_gemma2_softcap_is_sharded_and_runs_as_document_attention():
    """Gemma 2 (eager, softcapped): both layers' attention between all-to-alls; the full layer's
    mask proven causal, the windowed layer's proven a window of 6; both then run as document
    attention with the cap (no score matrix, no mask), and nothing is left as softcap_attention."""
    from tests.distributed.models import build

    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(0))
    model = build("gemma2")
    report = trace_plan(model, input_ids=ids, labels=ids, use_cache=False, world=2)
    text = str(report)
    assert text.count("softcap_attention") >= 2 and text.count("-> rewritten") == 2, text
    assert "proven causal: softcap_attention_1" in text, text
    assert "attention masked to a sliding window of 6" in text and "a softcap of 0.5 in the kernel" in text, text
    assert "causal attention with a logit softcap" in text and "the score matrix is never built" in text, text
    [(gm, _, _)] = capture(model, input_ids=ids, labels=ids, use_cache=False, world=2)
    calls = [n for n in gm.graph.nodes if n.target is DOCUMENT_ATTENTION]
    assert sorted((n.args[5] or 0, n.args[6]) for n in calls) == [(0, 0.5), (6, 0.5)], gm.code  # window 0: none
    assert not any(n.target is autosp.kernels.softcap_attention.softcap_attention for n in gm.graph.nodes)
