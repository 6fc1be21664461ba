"""autosp::embedding_grad: torch's embedding backward, the same bits every time, compiled or not
(Inductor's own lowering of the embedding backward is atomic adds, whose bits vary)."""

from __future__ import annotations

import torch

from autosp.kernels.embedding_grad import embedding_grad


def _batch():
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(2, 4096, 64, generator=g)
    ids = torch.randint(0, 50, (2, 4096), generator=g)  # every row hit by ~160 tokens
    return grad, ids


def test_equals_torch_and_pads():
    grad, ids = _batch()
    for padding in (-1, 3):
        want = torch.ops.aten.embedding_dense_backward(grad, ids, 50, padding, False)
        got = embedding_grad(grad, ids, 50, padding)
        assert torch.equal(got, want)
    assert not embedding_grad(grad, ids, 50, 3)[3].any()


def test_compiled_it_gives_the_same_bits_every_run():
    grad, ids = _batch()
    first = embedding_grad(grad, ids, 50, -1)
    compiled = torch.compile(lambda g, i: embedding_grad(g, i, 50, -1), backend="inductor")
    assert all(torch.equal(compiled(grad, ids), first) for _ in range(8))
