"""The local (communication-free) pieces of autosp.collectives against plain slicing, and the
shapes of the collectives on a fake group (no data moves there; tests/distributed checks values).

Legend: B batch, S sequence, L local sequence ceil(S/P), P ranks, V vocab, H inner size.
"""

from __future__ import annotations

import pytest
import torch

from autosp import collectives
from autosp.collectives import pad_dim, shard_seq, unshard_seq
from tests.harness_fake import fake_group


def _ceil(a, b):
    return -(-a // b)


@pytest.mark.parametrize("S,P", [(17, 2), (16, 4), (5, 4), (13, 3), (3, 8), (1, 2)])
def test_shards_concatenate_to_the_padded_sequence(S, P):
    x = torch.randn(2, S, 3)
    shards = [shard_seq(x, r, P, 1, S, 1, 1, -7.0) for r in range(P)]
    L = _ceil(S, P)
    assert all(s.shape == (2, L, 3) for s in shards)
    whole = torch.cat(shards, dim=1)
    assert torch.equal(unshard_seq(whole, 1, S, 1, 1), x)
    assert (whole[:, S:] == -7.0).all()  # padding holds the pad value (labels: ignore_index)
    assert unshard_seq(whole, 1, S, 1, 1).is_contiguous()


def test_sequence_on_the_last_dim_and_integer_pad():
    S, P = 7, 3
    ids = torch.arange(2 * S).view(2, S)
    shards = [shard_seq(ids, r, P, -1, S, 1, 1, -100) for r in range(P)]
    assert [s.tolist() for s in shards][2] == [[6, -100, -100], [13, -100, -100]]
    assert shards[0].dtype == torch.int64


@pytest.mark.parametrize("B,S,P", [(3, 7, 2), (2, 8, 4), (1, 5, 4)])
def test_flattened_outer_dim(B, S, P):
    """``[B*S]`` (labels.view(-1)): the sequence is inner of the batch, outer = B."""
    x = torch.arange(B * S)
    L = _ceil(S, P)
    want = torch.nn.functional.pad(x.view(B, S), (0, L * P - S), value=-100)
    shards = [shard_seq(x, r, P, 0, S, B, 1, -100) for r in range(P)]
    for r, s in enumerate(shards):
        assert torch.equal(s, want[:, r * L : (r + 1) * L].reshape(-1))
    # gather: shards side by side along L, flattened again; unshard drops the padding of each row
    gathered = torch.stack([s.view(B, L) for s in shards], dim=1).reshape(B * L * P)
    assert torch.equal(unshard_seq(gathered, 0, S, B, 1), x)


def test_flattened_outer_and_inner_dims():
    """``[B*S*H, V]``: outer = B, inner = H."""
    B, S, H, V, P = 2, 5, 3, 4, 2
    x = torch.randn(B, S, H, V)
    flat = x.reshape(B * S * H, V)
    L = _ceil(S, P)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, L * P - S), value=0.5)
    for r in range(P):
        s = shard_seq(flat, r, P, 0, S, B, H, 0.5)
        assert torch.equal(s, padded[:, r * L : (r + 1) * L].reshape(B * L * H, V))
    assert torch.equal(unshard_seq(padded.reshape(B * L * P * H, V), 0, S, B, H), flat)


def test_unshard_keeps_this_ranks_real_positions():
    """As output_layout trims: rank 1 of 2 at S = 17 holds 8 real positions of its 9."""
    x = torch.randn(2, 17, 3)
    local = shard_seq(x, 1, 2, 1, 17, 1, 1, 0.0)
    assert torch.equal(unshard_seq(local, 1, 8, 1, 1), x[:, 9:])


def test_shard_gradient_is_zero_padded():
    x = torch.randn(1, 9, 2, requires_grad=True)
    shard_seq(x, 1, 2, 1, 9, 1, 1, 0.0).sum().backward()
    assert torch.equal(x.grad[:, :5], torch.zeros(1, 5, 2))
    assert torch.equal(x.grad[:, 5:], torch.ones(1, 4, 2))


def test_shard_gradients_of_all_ranks_add_up_to_the_whole():
    """Flattened ``[B*S, 4]``: each real position's gradient comes from exactly one rank's slice."""
    B, S, P = 2, 7, 3
    L = _ceil(S, P)
    x = torch.randn(B * S, 4, requires_grad=True)
    grads = []
    for r in range(P):
        grad_out = torch.randn(B * L, 4)
        (gx,) = torch.autograd.grad(shard_seq(x, r, P, 0, S, B, 1, 0.0), x, grad_out)
        want = torch.zeros(B, L * P, 4)
        want[:, r * L : (r + 1) * L] = grad_out.view(B, L, 4)
        assert torch.equal(gx, want[:, :S].reshape(B * S, 4))
        grads.append(gx)
    covered = sum((g != 0).int() for g in grads)
    assert torch.equal(covered, torch.ones(B * S, 4, dtype=torch.int))


def test_pad_dim():
    x = torch.ones(2, 3, dtype=torch.bool)
    y = pad_dim(x, 1, 2, False)
    assert y.shape == (2, 5) and not y[:, 3:].any() and y.dtype == torch.bool
    assert pad_dim(x, 0, 0, True) is x
    z = pad_dim(torch.zeros(2, 3), 0, 1, float("-inf"))
    assert z.shape == (3, 3) and torch.isinf(z[2]).all()


@pytest.mark.parametrize("P", [2, 4])
def test_collective_shapes_on_a_fake_group(P):
    B, N, L, H = 2, 8, 3, 5
    with fake_group(P):
        import torch.distributed as dist

        name = dist.group.WORLD.group_name
        x_BNLH = torch.randn(B, N, L, H)
        x_BKSH = collectives.seq_to_head(x_BNLH, name, P, 2, 1)
        assert x_BKSH.shape == (B, N // P, L * P, H)
        assert collectives.head_to_seq(x_BKSH, name, P, 2, 1).shape == (B, N, L, H)
        assert collectives.gather_seq(torch.randn(B, L, H), name, P, 1, 1, 1).shape == (B, L * P, H)
        assert collectives.gather_seq(torch.randn(B * L, H), name, P, 0, B, 1).shape == (B * L * P, H)
        assert collectives.all_reduce_sum(torch.tensor(3.0), name, P).shape == ()


def _all_to_all_by_hand(per_rank):
    """What an all-to-all over dim 0 delivers: rank r gets row r of every rank, in rank order."""
    world = len(per_rank)
    return [torch.stack([per_rank[src][r] for src in range(world)]) for r in range(world)]


@pytest.mark.parametrize("P,n_kv,seq_dim,head_dim", [(2, 2, 2, 1), (4, 4, 2, 1), (2, 2, 1, 2)])
def test_one_all_to_all_for_q_k_v_equals_three(P, n_kv, seq_dim, head_dim):
    """seq_to_head_many's pack / all-to-all / unpack gives each rank what three seq_to_head calls
    give it (q at 8 heads, k and v at their own head count), simulated on P ranks in one process."""
    g = torch.Generator().manual_seed(P)
    L, H = 3, 5

    def shard(heads):  # [B, N, L, H] (or [B, L, N, H] when the heads are on dim 2)
        shape = [2, heads, L, H] if head_dim == 1 else [2, L, heads, H]
        return torch.randn(*shape, generator=g)

    qkv = [[shard(8), shard(n_kv), shard(n_kv)] for _ in range(P)]  # per rank: its sequence shard
    packed = [collectives.pack_head_chunks(xs, P, head_dim) for xs in qkv]
    received = _all_to_all_by_hand(packed)
    fused = [collectives.unpack_head_chunks(y, qkv[r], P, seq_dim, head_dim) for r, y in enumerate(received)]
    for t in range(3):  # the separate path, with the same hand-made all-to-all
        moved = [torch.movedim(xs[t].unflatten(head_dim, (P, -1)), head_dim, 0) for xs in qkv]
        for r, y in enumerate(_all_to_all_by_hand(moved)):
            want = torch.movedim(y, 0, seq_dim).flatten(seq_dim, seq_dim + 1)
            assert torch.equal(fused[r][t], want)
            # and it is the right data: rank r holds head chunk r of the whole sequence
            whole = torch.cat([xs[t] for xs in qkv], dim=seq_dim)
            k = whole.shape[head_dim] // P
            assert torch.equal(want, whole.narrow(head_dim, r * k, k))


def test_inductor_packs_q_k_v_in_one_kernel_without_extra_copies():
    """The pack's per-tensor reshape copies and the cat are one generated kernel that writes each
    tensor's head chunks straight into the send buffer (no copy, then cat)."""
    from tests.harness_fake import inductor_code

    q = torch.randn(1, 16, 8, 4).transpose(1, 2)  # [B, N, L, H] as HF makes it: a transposed view
    k, v = torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 4)
    code = inductor_code(lambda q, k, v: collectives.pack_head_chunks([q, k, v], 2, 1), q, k, v)
    kernels = [line for line in code.splitlines() if "async_compile." in line and " = " in line]
    assert len(kernels) == 1 and "cat" in kernels[0], kernels
