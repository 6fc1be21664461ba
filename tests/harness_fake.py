"""One-process graph tests with torch's in-process fake process group (tier 1).

``fake_group(P)`` makes a default group of P ranks that does no communication, so the passes
plan and rewrite as on rank 0 of P. ``capture(model, *args, **kwargs)`` compiles ``model`` with
a backend that runs autosp's pipeline and records each region's rewritten graph and plan, then
runs the *original* graph (no collective is ever executed).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist

import autosp
from autosp._torch_private import init_fake_process_group
from autosp.backend import plan_region


@contextlib.contextmanager
def fake_group(world: int):
    init_fake_process_group(rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def capture(model, *args, options=None, dynamic=False, **kwargs):
    """[(rewritten GraphModule, Plan, example inputs)] for every region of ``model(*args, **kwargs)``."""
    cfg = autosp.Config.from_options(options or {})
    regions = []

    def backend(gm, example_inputs):
        original = copy.deepcopy(gm)
        gm, plan = plan_region(gm, example_inputs, cfg)
        regions.append((gm, plan, list(example_inputs)))
        return original.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=dynamic)(*args, **kwargs)
    return regions
