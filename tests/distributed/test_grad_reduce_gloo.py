"""Tier 2: with ``overlap_grad_reduce`` the compiled backward leaves every parameter gradient as
the one-device gradient on every rank, bit-equal across ranks, with no ``reduce_gradients``
after it (gloo, 2 processes: Inductor with every window split, a tied table); without it the
same comparison fails (the check can tell). The parity cases with the option (2 and 4 ranks,
aot_eager, offload, tiles, a tied table) also compare the gradients as the backward leaves them
(tests/distributed/parity.py), and the sharded optimizer's Inductor case trains on them
(tests/distributed/test_sharded_optimizer_gloo.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.harness import run_group

CASES = {
    # a tied table (gemma3: lm_head reads the embedding's table, a padding row): its two uses' gradients
    "tied aot_eager": dict(compiler="aot_eager", overlap_grad_reduce=True),
    # defer_weight_grads with every matmul "long": one per window, each split into a head and the
    # rest (exact), its gradient all-reduce after the window's wait; Inductor lowers the slices and cat
    "inductor, split windows": dict(compiler="inductor", overlap_grad_reduce=True),
    "off (control)": dict(compiler="aot_eager"),
}


def _grads(rank: int, world: int, names: list[str], device: str = "cpu") -> dict:
    import contextlib
    from unittest import mock

    from autosp.passes import defer_weight_grads as dwg

    splits = []
    split_head = dwg._split_head

    def counted(*args):
        splits.append(split_head(*args))
        return splits[-1]

    out = {}
    for name in names:
        splits.clear()
        with contextlib.ExitStack() as patches:
            if "split windows" in name:
                patches.enter_context(mock.patch.multiple(dwg, GEMM_FLOPS_PER_S=1e3, HEAD_S=1e-12, HEAD_ROWS=8,
                                                          _split_head=counted))
            out[name] = {**_grads_of(name, device), "splits": sum(splits)}
    return out


def _grads_of(name: str, device: str = "cpu") -> dict:
    import autosp
    from tests.distributed.models import VOCAB, build

    torch._dynamo.reset()
    model = build("gemma3" if name.startswith("tied") else "llama").to(device)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(3)).to(device)
    compiled = torch.compile(model, backend=autosp.backend(outputs="full", logits="drop", **CASES[name]))
    loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()  # no reduce_gradients
    ref_loss = ref(input_ids=ids, labels=ids, use_cache=False).loss
    ref_loss.backward()
    grad_err = max(((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)).item()
                   for p, q in zip(model.parameters(), ref.parameters(), strict=True))
    # the bits of every gradient: replicas of a parameter must stay equal, so must their updates
    digest = [p.grad.contiguous().view(torch.int32).sum().item() for p in model.parameters()]
    return {"loss_err": abs(loss.item() - ref_loss.item()) / ref_loss.item(), "grad_err": grad_err,
            "digest": digest}


def test_gradients_leave_the_backward_as_the_one_device_gradient():
    names = list(CASES)
    check_gradients(run_group(2, _grads, names, timeout=900), names)


def check_gradients(results: list[dict], names: list[str]) -> None:
    """Every rank's loss and gradients against one device's; replicas' gradients bit-equal."""
    for name in names:  # the same bits on every rank (the embedding's table made on each from gathered tokens)
        if name != "off (control)":
            assert all(r[name]["digest"] == results[0][name]["digest"] for r in results), name
    for per_rank in results:
        for name in names:
            r = per_rank[name]
            assert r["loss_err"] < 1e-5, (name, r)
            if name == "off (control)":
                assert r["grad_err"] > 1e-2, r  # partial gradients: the comparison can fail
            else:
                assert r["grad_err"] < 1e-4, (name, r)
            assert (r["splits"] > 0) == ("split windows" in name), (name, r["splits"])


def _gradient_groups(rank: int, world: int, store_dir: str) -> list:
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    from autosp._torch_private import resolve_group
    from autosp.backend import gradient_group_name

    out = []
    for again in range(2):
        if again:  # the default group made again, under the same name
            dist.destroy_process_group()
            dist.init_process_group("gloo", store=dist.FileStore(f"{store_dir}/again", world), rank=rank,
                                    world_size=world)
        group = dist.group.WORLD
        name = gradient_group_name(group)
        assert gradient_group_name(group) == name  # made once
        total = fc.all_reduce(torch.full((3,), float(rank + 1)), "sum", name)  # usable, over the same ranks
        ranks = dist.get_process_group_ranks(resolve_group(name))
        out.append((group.group_name, name, ranks, total.tolist()))
    return out


def _disagreeing_ranks(rank: int, world: int) -> str | None:
    import torch.distributed as dist

    from autosp.backend import gradient_group_name

    if rank == 0:  # a group of its own: rank 0 knows one group more, and would name the next one differently
        dist.new_group([0], use_local_synchronization=True)
    return gradient_group_name(dist.group.WORLD)


def test_ranks_that_would_name_the_gradient_communicator_differently_share_the_group_instead_of_hanging():
    # fresh ranks: after it rank 0 knows one group more than rank 1
    assert run_group(2, _disagreeing_ranks, timeout=120, fresh=True) == [None, None]


def test_the_gradient_communicator_is_a_second_group_over_the_same_ranks_made_again_with_its_group(tmp_path):
    for rank_result in run_group(2, _gradient_groups, str(tmp_path), timeout=300, fresh=True):  # the group made again
        for sp_name, grad_name, ranks, total in rank_result:
            assert grad_name != sp_name and ranks == [0, 1] and total == [3.0] * 3


def _embedding_both_ways(rank: int, world: int) -> dict:
    """``embedding_gathered_grad`` with every rank's ids gathered in the forward and with them
    handed over whole (``pad_to_shards`` of the whole ids), on an odd length (padded)."""
    import torch.distributed as dist

    from autosp.collectives import embedding_gathered_grad, pad_to_shards, shard_seq

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (2, 7), generator=gen)
    table = torch.randn(50, 4, generator=gen)
    grad_out = torch.randn(2, 7, 4, generator=gen)
    shard = shard_seq(ids, rank, world, 1, 7, 1, 1, 0)
    name = dist.group.WORLD.group_name
    outs, grads = [], []
    for whole in (None, pad_to_shards(ids, world, 1, 7, 0)):
        w = table.clone().requires_grad_(True)
        out = embedding_gathered_grad(shard, w, None, name, world, 1, whole)
        # the gradient convention: a sequence shard's gradient is P x the true one
        (out * shard_seq(grad_out * world, rank, world, 1, 7, 1, 1, 0.0)).sum().backward()
        outs.append(out.detach())
        grads.append(w.grad)
    # the table's gradient of the whole sequence, one device (the gathered gradient is the group's mean)
    want = table.clone().requires_grad_(True)
    (torch.nn.functional.embedding(ids, want) * grad_out).sum().backward()
    return {"outs equal": torch.equal(*outs), "grads equal": torch.equal(*grads),
            "grad": grads[1].tolist(), "err": (grads[1] - want.grad).abs().max().item()}


@pytest.mark.parametrize("world", [2, 4])
def test_embedding_gradient_with_the_ids_handed_over_equals_the_gathered_one(world):
    results = run_group(world, _embedding_both_ways)
    for res in results:
        assert res["outs equal"] and res["grads equal"]  # the same bits either way
        assert res["grad"] == results[0]["grad"]  # and on every rank
        assert res["err"] < 1e-6  # the one-device gradient
