"""Tier 2: sequence-parallel groups other than the default one, and the plan agreement check."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.harness import run_group


def _mesh_dp_sp(rank: int, world: int) -> dict:
    """SP=2 x DP=2 on a 2-D mesh: each DP replica trains on its own batch; the mean of the
    gradients over all four ranks equals the mean of the two one-device gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import autosp
    from tests.distributed.models import VOCAB, build, forward

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    dp = mesh.get_local_rank("dp")
    model = build("llama")
    refs = [copy.deepcopy(model) for _ in range(2)]
    batches = [torch.randint(0, VOCAB, (1, 19), generator=torch.Generator().manual_seed(7 + i)) for i in range(2)]
    compiled = torch.compile(model, backend=autosp.backend(mesh=mesh, sp_dim="sp", compiler="aot_eager", outputs="full"))
    loss, _ = forward(compiled, batches[dp], batches[dp])
    loss.backward()
    autosp.reduce_gradients(model, group=dist.group.WORLD)
    ref_losses = []
    for ref, ids in zip(refs, batches, strict=True):
        ref_loss, _ = forward(ref, ids, ids)
        ref_loss.backward()
        ref_losses.append(ref_loss.item())
    grad_err = 0.0
    for p, a, b in zip(model.parameters(), refs[0].parameters(), refs[1].parameters(), strict=True):
        want = (a.grad + b.grad) / 2
        grad_err = max(grad_err, ((p.grad - want).abs().max() / want.abs().max().clamp_min(1e-12)).item())
    return {"loss_err": abs(loss.item() - ref_losses[dp]) / ref_losses[dp], "grad_err": grad_err}


def test_mesh_dp_times_sp():
    for r in run_group(4, _mesh_dp_sp):
        assert r["loss_err"] <= 1e-5, r
        assert r["grad_err"] <= 1e-4, r


def _mismatch(rank: int, world: int) -> str:
    """Ranks that pass different batches (lengths 17 and 19) build different plans: every rank
    raises PlanMismatchError naming the difference, before any collective of the region."""
    import autosp
    from tests.distributed.models import VOCAB, build, forward

    model = build("llama")
    ids = torch.randint(0, VOCAB, (1, 17 + 2 * rank))
    compiled = torch.compile(model, backend=autosp.backend(compiler="aot_eager"), dynamic=False)
    try:
        forward(compiled, ids, ids)
    except autosp.PlanMismatchError as e:
        return str(e)
    return "no error"


def test_plan_mismatch_raises_on_every_rank():
    for message in run_group(2, _mismatch, timeout=300):
        assert "different plans" in message, message
        assert "seq_len" in message, message


def _no_attention(rank: int, world: int) -> float:
    """A model without attention runs unchanged under a group of 2: the same output as eager."""
    import autosp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 11, 8)
    compiled = torch.compile(copy.deepcopy(model), backend=autosp.backend(compiler="aot_eager"))
    return (compiled(x) - model(x)).abs().max().item()


@pytest.mark.parametrize("world", [2])
def test_model_without_attention_runs_unchanged(world):
    assert max(run_group(world, _no_attention)) == 0.0
