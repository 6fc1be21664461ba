"""host_offload's table of prefetched copies: entries go with their host tensors."""

from __future__ import annotations

import gc

import pytest
import torch

import autosp
from autosp.kernels import host_offload
from autosp.kernels.host_offload import InFlight
from tests.passes.models_tiny import tiny_llama


def test_taken_entries_leave_and_their_host_tensors_die_quietly():
    table, started = InFlight(), []
    h = torch.empty(8)
    table.start(h, lambda t: started.append(t) or "copy")
    table.start(h, lambda t: started.append(t) or "again")  # started once
    assert len(table) == 1 and len(started) == 1
    assert table.take(h) == "copy" and len(table) == 0
    assert table.take(h) is None
    del h
    gc.collect()
    assert len(table) == 0


def test_an_abandoned_prefetch_goes_with_its_host_tensor():
    """A backward that raises between a prefetch and its reload leaves an entry; the entry (and
    the device buffer in it) must not outlive the host tensor, which dies with the graph."""
    table = InFlight()
    h, other = torch.empty(8), torch.empty(8)
    table.start(h, lambda t: "copy of h")
    table.start(other, lambda t: "copy of other")
    del h
    gc.collect()
    assert len(table) == 1 and table.take(other) == "copy of other"


@pytest.mark.gpu
def test_cuda_a_backward_that_fails_leaves_nothing_in_flight(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tiny_llama(layers=4, hidden=256, heads=4, kv_heads=2).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=autosp.backend(logits="drop", recompute="full", offload=True))
    compiled(input_ids=ids, labels=ids).loss.backward()  # compile both graphs
    model.zero_grad(set_to_none=True)
    real, calls = host_offload._start_copy, []

    def second_copy_fails(h, device):  # the first reload prefetches (copy 1), then copies its own (2)
        calls.append(h.shape)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(h, device)

    monkeypatch.setattr(host_offload, "_start_copy", second_copy_fails)
    loss = compiled(input_ids=ids, labels=ids).loss
    try:
        loss.backward()
    except RuntimeError as e:
        assert "injected" in str(e)
    else:
        raise AssertionError("the backward did not fail")
    assert len(calls) == 2  # a prefetch was started, then the reload's own copy failed
    del loss
    gc.collect()
    # Gone with the graph's saved host tensors. (On an H200 with torch 2.11 it was gone already
    # when the exception had unwound: the failed backward let go of its host tensors.)
    assert host_offload.in_flight() == 0
    monkeypatch.setattr(host_offload, "_start_copy", real)
    model.zero_grad(set_to_none=True)
    compiled(input_ids=ids, labels=ids).loss.backward()  # and the next step runs
    torch.cuda.synchronize()
    assert host_offload.in_flight() == 0
