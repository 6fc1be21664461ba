"""Graph tests in one process (tier 1 of DESIGN section 6): a fake process group, the plan of a
traced model, and the rewritten graph itself.

The one file of the single-process tests that touches private torch test helpers (through
``autosp._torch_private``). Collectives on the fake group complete at once and move no data, so
tests here check structure and shapes, never values that crossed ranks (tests/distributed does).

    with fake_group(2):                                   # torch.distributed: a group of 2, rank 0
        [(gm, plan, inputs)] = capture(model, ids)        # one region: rewritten graph, plan, inputs
    report = trace_plan(model, ids, world=2)              # autosp.explain under a fake group
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.fx as fx

import autosp
from autosp._torch_private import init_fake_process_group
from autosp.backend import plan_region
from autosp.plan import Plan

_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(autosp.Config))


@contextlib.contextmanager
def fake_group(world: int, rank: int = 0) -> Iterator[None]:
    """The default process group is a fake one of ``world`` ranks; this process is ``rank``."""
    assert not dist.is_initialized(), "a process group is already initialized"
    init_fake_process_group(rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _group(world: int | None, rank: int):
    """``None``: the group the caller set up (or none); 1: no group at all; else a fake group."""
    return fake_group(world, rank) if world is not None and world > 1 else contextlib.nullcontext()


class Region(NamedTuple):
    """One compiled region after autosp's passes (``plan.passes[0][1]`` is the code before them)."""

    gm: fx.GraphModule  # rewritten: meta["val"] are this rank's local values
    plan: Plan
    example_inputs: list[Any]  # what Dynamo handed the backend (real tensors)


def capture(
    model,
    *args: Any,
    options: dict[str, Any] | None = None,
    dynamic: bool = False,
    world: int | None = None,
    rank: int = 0,
    grad: bool = False,
    **kwargs: Any,
) -> list[Region]:
    """Every region of ``model(*args, **kwargs)`` as autosp rewrote it (one per Dynamo graph).

    Options come from ``options`` and from keyword arguments that are ``autosp.Config`` fields
    (``compiler`` defaults to "eager"); the other keyword arguments go to the model. The call
    runs the *original* graphs (no collective ever runs), under ``torch.no_grad()`` unless
    ``grad``. ``world`` sets up a fake group around the call (see :func:`_group`).
    """
    more = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_NAMES}
    cfg = autosp.Config.from_options({"compiler": "eager", **(options or {}), **more})
    regions: list[Region] = []

    def backend(gm: fx.GraphModule, example_inputs: list[Any]):
        original = copy.deepcopy(gm)
        gm, plan = plan_region(gm, example_inputs, cfg)
        regions.append(Region(gm, plan, list(example_inputs)))
        return original.forward

    torch._dynamo.reset()
    with _group(world, rank), torch.set_grad_enabled(grad):
        torch.compile(model, backend=backend, dynamic=dynamic)(*args, **kwargs)
    return regions


def trace_plan(model_or_fn, *args: Any, world: int = 2, rank: int = 0, **kwargs: Any) -> autosp.Report:
    """``autosp.explain(model_or_fn, *args, **kwargs)`` as rank ``rank`` of a fake group of ``world``."""
    kwargs.setdefault("compiler", "eager")
    torch._dynamo.reset()
    with _group(world, rank):
        return autosp.explain(model_or_fn, *args, **kwargs)


def nodes_calling(gm: fx.GraphModule, target: Any) -> list[fx.Node]:
    """The nodes whose target is ``target``, in graph order (matched by target, never by name)."""
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and n.target == target]


def shape_of(node: fx.Node) -> list[int]:
    """The (local) shape in a node's ``meta["val"]``, as ints."""
    return [int(s) for s in node.meta["val"].shape]


def inductor_code(fn, *args: Any, backend: Any = "inductor", backward: bool = False) -> str:
    """The source Inductor generates for ``fn(*args)`` (torch's private ``run_and_get_code``),
    compiled with ``backend``; with ``backward``, for the backward of ``fn(*args).sum()`` too."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend)

    def run():
        out = compiled(*args)
        if backward:
            out.sum().backward()
        return out

    _, code = run_and_get_code(run)
    return "\n".join(code)
