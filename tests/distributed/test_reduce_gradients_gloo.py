"""``autosp.reduce_gradients``: the mean over the group, in place, for every kind of gradient."""

from __future__ import annotations

import torch

from autosp import runtime
from tests.distributed.harness import run_group


def _reduce(rank: int, world: int) -> dict:
    """Rank r's gradients are (r + 1) * base: the mean is base * (world + 1) / 2, exactly."""
    model = torch.nn.Module()
    big = runtime.SMALL_GRAD_BYTES // 4 + 3  # float32 elements: just above the coalescing limit
    model.large = torch.nn.Parameter(torch.zeros(big))  # reduced in place
    model.large_bf16 = torch.nn.Parameter(torch.zeros(big, dtype=torch.bfloat16))
    model.small = torch.nn.Parameter(torch.zeros(5, 3))  # coalesced
    model.small_bf16 = torch.nn.Parameter(torch.zeros(7, dtype=torch.bfloat16))
    model.strided = torch.nn.Parameter(torch.zeros(big // 64, 64))  # its gradient is not contiguous
    model.unused = torch.nn.Parameter(torch.zeros(3))  # no gradient
    bases, storages = {}, {}
    for name, p in model.named_parameters():
        if name == "unused":
            continue
        base = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape).remainder(17).to(p.dtype)
        bases[name] = base
        p.grad = base * (rank + 1)
        if name == "strided":
            p.grad = (base * (rank + 1)).t().contiguous().t()
        storages[name] = p.grad.data_ptr()
    runtime.reduce_gradients(model)
    errors = {name: (p.grad.float() - bases[name].float() * (world + 1) / 2).abs().max().item()
              for name, p in model.named_parameters() if name != "unused"}
    in_place = {name: p.grad.data_ptr() == storages[name] for name, p in model.named_parameters() if name != "unused"}
    return {"errors": errors, "in_place": in_place, "unused": model.unused.grad is None,
            "strided_still_strided": not model.strided.grad.is_contiguous()}


def test_mean_is_exact_in_place_for_large_small_mixed_and_strided_gradients():
    for out in run_group(2, _reduce, timeout=300):
        assert out["errors"] == dict.fromkeys(out["errors"], 0.0), out["errors"]
        assert all(out["in_place"].values()), out["in_place"]  # the optimizer's tensors, not copies
        assert out["unused"]
        assert out["strided_still_strided"]


def test_one_process_is_a_no_op():
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.ones(2, 2)
    runtime.reduce_gradients(model)  # no process group: nothing to average
    assert torch.equal(model.weight.grad, torch.ones(2, 2))
