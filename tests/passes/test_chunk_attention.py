"""chunk_attention: self-attention becomes autosp::chunked_attention over sequence chunks; the
loss and every gradient are those of the model (fp32: loss 1e-6 relative, gradients 1e-5: the
chunks sum the softmax in another order); grouped KV reaches the op unrepeated; calls the op
cannot take are left alone and said so."""

from __future__ import annotations

import pytest
import torch

import autosp
from autosp.passes._attention import SDPA_TARGETS
from autosp.passes.chunk_attention import CHUNKED_ATTENTION
from tests.harness_fake import capture
from tests.passes.models_tiny import tiny_llama


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and (n.target in target if isinstance(target, tuple)
                                                                       else n.target is target)]


@pytest.mark.parametrize("world,kv_local", [(1, 2), (2, 1)])
def test_attention_becomes_chunked_with_kv_at_its_own_head_count(world, kv_local):
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    [(gm, plan, _)] = capture(tiny_llama(layers=2), input_ids=ids, labels=ids, use_cache=False, world=world,
                              attention_chunks=3)
    calls = _calls(gm, CHUNKED_ATTENTION)
    assert len(calls) == 2 and not _calls(gm, SDPA_TARGETS)
    for c in calls:
        q, k, v, is_causal, _, chunks, offload, backend = c.args
        assert q.meta["val"].shape[1] == 4 // world and k.meta["val"].shape[1] == kv_local  # no repeated KV
        assert is_causal and chunks == 3 and offload is False and backend == "auto"
    assert not any(n.target is torch.repeat_interleave for n in gm.graph.nodes)
    assert any("chunk_attention: 2 attention calls over 3 sequence chunks" in n for n in plan.notes)


def test_a_masked_attention_is_left_alone_and_said_so():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    pad = torch.ones(2, 16, dtype=torch.long)
    pad[0, :3] = 0
    [(gm, plan, _)] = capture(tiny_llama(), input_ids=ids, attention_mask=pad, use_cache=False, world=1,
                              attention_chunks=2)
    assert not _calls(gm, CHUNKED_ATTENTION) and len(_calls(gm, SDPA_TARGETS)) == 1
    assert any("left unchunked: it has an attention mask" in n for n in plan.notes)


def test_off_by_default_and_by_name():
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    for options in ({}, {"attention_chunks": 4, "disable_passes": ["chunk_attention"]}):
        [(gm, _, _)] = capture(tiny_llama(), input_ids=ids, use_cache=False, world=1, **options)
        assert not _calls(gm, CHUNKED_ATTENTION)


@pytest.mark.parametrize("bad", [0, -2, True, 2.0])
def test_bad_chunk_counts_are_refused(bad):
    with pytest.raises(ValueError, match="attention_chunks"):
        autosp.Config(attention_chunks=bad)


@pytest.mark.parametrize("options", [
    {"attention_chunks": 3},
    {"attention_chunks": 5, "recompute": "selective"},
    {"attention_chunks": 2, "recompute": "full", "offload": True, "tile_mlp": 2},
    {"attention_chunks": 3, "recompute": "selective", "offload": True, "compiler": "inductor"},
], ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_one_device_loss_and_gradients_are_unchanged(options):
    torch._dynamo.reset()
    ids = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(1))
    ref_model, model = tiny_llama(layers=2), tiny_llama(layers=2)
    ref = ref_model(input_ids=ids, labels=ids, use_cache=False).loss
    ref.backward()
    compiled = torch.compile(model, backend=autosp.backend(**{"compiler": "aot_eager", **options}))
    loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
