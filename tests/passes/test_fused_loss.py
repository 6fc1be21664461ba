"""fused_loss and its kernel: the chunked linear + cross-entropy equals the unfused one (loss
and gradients), is matched only where it is exact, and ``Config.logits`` does what it says.

Legend: N rows, D hidden, V vocab, C chunk rows. Tolerances: fp32, 1e-5 relative (the chunked
sums reorder additions); bf16 kernel against the bf16 reference, 2e-2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autosp
from autosp.kernels.linear_cross_entropy import linear_cross_entropy_loss
from tests.harness_fake import capture, nodes_calling
from tests.passes.models_tiny import tiny_llama


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_kernel_matches_cross_entropy_of_the_logits(dtype, tol, chunk):
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(37, 16, generator=g).to(dtype).requires_grad_()
    w = torch.randn(50, 16, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, 50, (37,), generator=g)
    t[3:9] = -100
    ref = F.cross_entropy((h @ w.t()).float(), t, reduction="sum")
    gh, gw = torch.autograd.grad(ref * 0.5, (h, w))
    out = linear_cross_entropy_loss(h, w, t, -100, chunk)
    fh, fw = torch.autograd.grad(out * 0.5, (h, w))
    assert out.dtype == torch.float32
    assert abs(out.item() - ref.item()) / ref.item() < tol
    assert _rel(fh, gh) < tol and _rel(fw, gw) < tol


def test_kernel_with_every_target_ignored_is_zero():
    h, w = torch.randn(5, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    out = linear_cross_entropy_loss(h, w, torch.full((5,), -100), -100, 2)
    out.backward()
    assert out.item() == 0.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_kernel_rejects_bad_shapes():
    with pytest.raises(ValueError, match="linear_cross_entropy"):
        linear_cross_entropy_loss(torch.randn(5, 4), torch.randn(6, 3), torch.zeros(5, dtype=torch.long), -100, 2)


def _llama_step(model, ids, labels, **options):
    compiled = torch.compile(model, backend=autosp.backend(compiler="aot_eager", **options), fullgraph=False)
    out = compiled(input_ids=ids, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("logits", ["keep", "detach", "drop"])
def test_one_device_loss_and_gradients_equal_the_unfused_model(logits):
    torch._dynamo.reset()
    ids = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    ref_model, model = tiny_llama(layers=2), tiny_llama(layers=2)
    ref = ref_model(input_ids=ids, labels=labels)
    ref.loss.backward()
    out, grads = _llama_step(model, ids, labels, loss_chunk=5, logits=logits)
    assert abs(out.loss.item() - ref.loss.item()) / ref.loss.item() < 1e-5
    for name, p in ref_model.named_parameters():
        assert _rel(grads[name], p.grad) < 1e-4, name
    if logits == "keep":
        torch.testing.assert_close(out.logits, ref.logits)
    elif logits == "detach":
        torch.testing.assert_close(out.logits, ref.logits)
        assert not out.logits.requires_grad
    else:
        assert out.logits.numel() == 0


def test_the_graph_calls_the_kernel_and_builds_no_logits_for_the_loss():
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    [(gm, plan, _)] = capture(tiny_llama(), input_ids=ids, labels=ids, world=2, logits="drop")
    assert len(nodes_calling(gm, linear_cross_entropy_loss)) == 1
    assert nodes_calling(gm, F.cross_entropy) == []
    assert nodes_calling(gm, torch._C._nn.linear)[-1].meta["val"].shape[-1] != 128  # no lm_head left
    assert any("fused over chunks" in n for n in plan.notes)
    assert any("logits dropped" in o for o in plan.outputs)


def test_keep_says_what_the_logits_cost():
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    [(gm, plan, _)] = capture(tiny_llama(), input_ids=ids, labels=ids, world=2)
    assert any("returns the logits" in n and "GiB per rank" in n for n in plan.notes)


class Head(nn.Module):
    def __init__(self, bias=False, smoothing=0.0, upcast=True):
        super().__init__()
        self.emb, self.head = nn.Embedding(32, 8), nn.Linear(8, 32, bias=bias)
        self.smoothing, self.upcast = smoothing, upcast

    def forward(self, ids):
        logits = self.head(torch.tanh(self.emb(ids)))
        logits = logits.float() if self.upcast else logits
        return F.cross_entropy(logits.view(-1, 32), ids.view(-1), label_smoothing=self.smoothing)


@pytest.mark.parametrize("kw,fused", [({}, True), ({"upcast": False}, True), ({"bias": True}, False),
                                      ({"smoothing": 0.1}, False)])
def test_only_exact_patterns_are_fused(kw, fused):
    torch.manual_seed(0)
    model = Head(**kw)
    ids = torch.randint(0, 32, (2, 9))
    [(gm, plan, inputs)] = capture(model, ids, world=1)
    assert bool(nodes_calling(gm, linear_cross_entropy_loss)) == fused
    torch.testing.assert_close(gm(*inputs)[0], model(ids))


def test_options_are_checked():
    with pytest.raises(ValueError, match="logits"):
        autosp.Config(logits="sometimes")
    with pytest.raises(ValueError, match="needs option 'fused_loss'"):
        autosp.Config(fused_loss=False, logits="drop")
    with pytest.raises(ValueError, match="loss_chunk"):
        autosp.Config(loss_chunk=0)


@pytest.mark.parametrize("grad", [True, False])
def test_gradients_are_computed_only_when_autograd_needs_them(monkeypatch, grad):
    from autosp.kernels import reference

    calls = []
    real = reference.linear_cross_entropy

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(reference, "linear_cross_entropy", spy)
    torch._dynamo.reset()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    model = tiny_llama()
    compiled = torch.compile(model, backend=autosp.backend(compiler="aot_eager"))
    with torch.set_grad_enabled(grad):
        loss = compiled(input_ids=ids, labels=ids).loss
    assert loss.requires_grad == grad
    assert calls and set(calls) == {grad}
    if grad:
        loss.backward()
        assert model.lm_head.weight.grad is not None


class InPlaceHead(nn.Module):
    """The logits (or h) written in place between the lm_head and the loss: never fused."""

    def __init__(self, how):
        super().__init__()
        self.emb, self.head, self.how = nn.Embedding(32, 8), nn.Linear(8, 32, bias=False), how

    def forward(self, ids):
        h = torch.tanh(self.emb(ids))
        logits = self.head(h)
        if self.how == "div_":
            logits.div_(4.0)
        elif self.how == "setitem":
            logits[..., 0] = -1e4
        elif self.how == "h_after":
            h.mul_(2.0)  # h changes after the lm_head read it
        return F.cross_entropy(logits.float().view(-1, 32), ids.view(-1))


@pytest.mark.parametrize("how", ["div_", "setitem", "h_after"])
def test_in_place_writes_prevent_fusion(how):
    torch.manual_seed(0)
    model = InPlaceHead(how)
    ids = torch.randint(0, 32, (2, 9))
    [(gm, plan, inputs)] = capture(model, ids, world=1)
    assert nodes_calling(gm, linear_cross_entropy_loss) == []
    torch.testing.assert_close(gm(*inputs)[0], model(ids))


def test_drop_leaves_values_computed_from_the_logits_alone():
    class ArgmaxToo(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(32, 8), nn.Linear(8, 32, bias=False)

        def forward(self, ids):
            logits = self.head(torch.tanh(self.emb(ids)))
            loss = F.cross_entropy(logits.float().view(-1, 32), ids.view(-1))
            return loss, logits, logits.argmax(-1)

    torch.manual_seed(0)
    model = ArgmaxToo()
    ids = torch.randint(0, 32, (2, 9))
    [(gm, plan, inputs)] = capture(model, ids, world=1, logits="drop")
    loss, logits, best = gm(*inputs)
    assert logits.numel() == 0
    torch.testing.assert_close(best, model(ids)[2])  # computed, not dropped


def test_linear_called_with_keywords_is_fused():
    class KwHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.w = nn.Embedding(32, 8), nn.Parameter(torch.randn(32, 8))

        def forward(self, ids):
            logits = F.linear(input=torch.tanh(self.emb(ids)), weight=self.w)
            return F.cross_entropy(logits.view(-1, 32), ids.view(-1))

    torch.manual_seed(0)
    model = KwHead()
    ids = torch.randint(0, 32, (2, 9))
    [(gm, plan, inputs)] = capture(model, ids, world=1)
    assert len(nodes_calling(gm, linear_cross_entropy_loss)) == 1
    torch.testing.assert_close(gm(*inputs)[0], model(ids))
