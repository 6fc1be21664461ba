"""The one home of every private torch API autosp touches (tested in tests/test_torch_private.py).

Each function here is a thin wrapper, so that a torch release that moves one of them breaks
one file, and its test says which.
"""

from __future__ import annotations

from typing import Any

import torch


def fake_mode_of(values: Any):
    """The FakeTensorMode the given fake values belong to (None if there is none).

    Not the tracing context's mode: Dynamo hands backends a fresh one, while the nodes'
    ``example_value`` stay in the mode they were traced under.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    for v in values:
        if isinstance(v, FakeTensor):
            return v.fake_mode
    from torch._guards import detect_fake_mode

    return detect_fake_mode(values)


def size_hint(x: Any) -> int:
    """A concrete value for an int or SymInt, without adding a guard."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        node = x.node
        hint = getattr(node, "hint", None)
        if hint is not None:
            return int(hint)
        from torch.fx.experimental import symbolic_shapes as ss

        for name in ("optimization_hint", "hint_int", "size_hint"):
            fn = getattr(ss, name, None)
            if fn is not None:
                return int(fn(x))
    return int(x)


def same_size(a: Any, b: Any) -> bool:
    """Whether two sizes are the same value: equal ints, or the same symbolic expression."""
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return False
    return a == b


def is_symbolic(x: Any) -> bool:
    return isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool))


def lookup_backend(name: str):
    """A registered Dynamo backend by name ("inductor", "aot_eager", ...)."""
    from torch._dynamo import lookup_backend as _lookup

    return _lookup(name)


def functional_collectives():
    """torch's functional collectives module (traceable, autograd-aware collectives by group name)."""
    import torch.distributed._functional_collectives as fc

    return fc


def resolve_group(name: str):
    """The ProcessGroup registered under ``name``."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def init_fake_process_group(rank: int, world_size: int) -> None:
    """Initialize torch.distributed with the in-process fake backend (tests of graph structure)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def compile_id() -> str:
    """Dynamo's id of the frame being compiled ("0/0": first frame, first compile), or "-"."""
    from torch._guards import CompileContext

    cid = CompileContext.current_compile_id()
    return str(cid) if cid is not None else "-"


def num_forward_returns() -> int | None:
    """In a forward compiler: how many of the forward graph's outputs are returned to the caller
    (mutated inputs, user outputs); the rest are saved for the backward. None when not training."""
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    meta = getattr(ctx, "fw_metadata", None) if ctx is not None else None
    return None if meta is None else meta.num_forward_returns


def compile_partitioned(gm, example_inputs, compiler: str, forward_hook, backward_hook):
    """Compile like the ``compiler`` backend ("inductor" or "aot_eager"), with hooks on the graphs
    AOTAutograd's partitioner made: ``forward_hook(gm, inputs)`` and ``backward_hook(gm, inputs)``
    edit the graph in place and return the (possibly changed) example inputs."""
    if compiler == "inductor":
        import torch._functorch.config as functorch_config
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner(g, inputs, **kwargs):
            if kwargs.get("is_backward"):
                inputs = backward_hook(g, inputs)
            elif not kwargs.get("is_inference"):
                inputs = forward_hook(g, inputs)
            return compile_fx_inner(g, inputs, **kwargs)

        # AOTAutograd's cache keys on the graph before the hooks: a hit would return what an
        # earlier compile with other hooks made (Inductor's own cache keys on the hooked graphs).
        with functorch_config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, inner_compile=inner)
    if compiler == "aot_eager":
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        def fw(g, inputs):
            return boxed_nop(g, forward_hook(g, inputs))

        def bw(g, inputs):
            return boxed_nop(g, backward_hook(g, inputs))

        return aot_autograd(fw_compiler=fw, bw_compiler=bw, inference_compiler=boxed_nop,
                            partition_fn=min_cut_rematerialization_partition,
                            keep_inference_input_mutations=True)(gm, example_inputs)
    raise ValueError(f"compiler {compiler!r} does not partition a forward and a backward graph")
