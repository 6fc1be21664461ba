"""The local (communication-free) pieces of autosp.collectives against plain slicing."""

from __future__ import annotations

import pytest
import torch

from autosp.collectives import pad_dim, shard_seq, unshard_seq


@pytest.mark.parametrize("S,P", [(17, 2), (16, 4), (5, 4), (13, 3)])
def test_shards_concatenate_to_the_padded_sequence(S, P):
    x = torch.randn(2, S, 3)
    shards = [shard_seq(x, r, P, 1, S, 1, 1, -7.0) for r in range(P)]
    L = -(-S // P)
    assert all(s.shape == (2, L, 3) for s in shards)
    whole = torch.cat(shards, dim=1)
    torch.testing.assert_close(unshard_seq(whole, 1, S, 1, 1), x)
    assert (whole[:, S:] == -7.0).all()  # padding holds the pad value (labels: ignore_index)


def test_flattened_sequence_dim():
    B, S, P = 3, 7, 2
    x = torch.arange(B * S).view(B * S)  # [B*S] with the sequence inner of the batch
    shards = [shard_seq(x, r, P, 0, S, B, 1, -100) for r in range(P)]
    L = -(-S // P)
    want = torch.nn.functional.pad(x.view(B, S), (0, L * P - S), value=-100)
    for r, s in enumerate(shards):
        assert torch.equal(s, want[:, r * L : (r + 1) * L].reshape(-1))


def test_shard_gradient_is_zero_padded():
    x = torch.randn(1, 9, 2, requires_grad=True)
    shard_seq(x, 1, 2, 1, 9, 1, 1, 0.0).sum().backward()
    assert torch.equal(x.grad[:, :5], torch.zeros(1, 5, 2))
    assert torch.equal(x.grad[:, 5:], torch.ones(1, 4, 2))


def test_pad_dim():
    x = torch.ones(2, 3, dtype=torch.bool)
    y = pad_dim(x, 1, 2, False)
    assert y.shape == (2, 5) and not y[:, 3:].any() and y.dtype == torch.bool
