"""The one home of every private torch API autosp touches (tested in tests/test_torch_private.py).

Each function here is a thin wrapper, so that a torch release that moves one of them breaks
one file, and its test says which. This file holds the compiler's and the process groups'
internals; two concepts have a file of their own, read through this package like the rest:
``attention.py`` (torch's fused SDPA kernels as private aten ops that return the log-sum-exp)
and ``peer_memory.py`` (GPU memory mapped across the ranks, and the CUDA driver's stream memory
operations that signal through it).
"""

from __future__ import annotations

import contextlib
import functools
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


def collective_wait_op():
    """The op a traced functional collective's result goes through before it is read
    (``_c10d_functional.wait_tensor``): in an AOTAutograd graph, where a collective ends."""
    return torch.ops._c10d_functional.wait_tensor.default


def all_to_all_unwaited(x: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int],
                        group_name: str) -> torch.Tensor:
    """torch's functional all-to-all, issued and NOT waited for (no autograd): read the result
    through ``functional_collectives().wait_tensor``. The public functional collectives wait at
    once while a graph is traced, which puts the wait right after the issue in the graph, so
    nothing can be placed between the two; this is their op alone, which Inductor lowers as a
    collective kernel (its input kept alive until the wait)."""
    return torch.ops._c10d_functional.all_to_all_single(x, output_split_sizes, input_split_sizes, group_name)


def resolve_group(name: str):
    """The ProcessGroup registered under ``name``."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def local_group_name(ranks: list[int]) -> str:
    """The name ``dist.new_group(ranks, use_local_synchronization=True)`` would give the group if
    made now on this rank: torch hashes the ranks with the number of groups this rank knows, so
    ranks that have made different groups name it differently (and its creation then waits for
    ever). Compared across the ranks before making one."""
    from torch.distributed.distributed_c10d import _hash_ranks_to_str

    return _hash_ranks_to_str(list(ranks))


def init_fake_process_group(rank: int, world_size: int) -> None:
    """Initialize torch.distributed with the in-process fake backend (tests of graph structure)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


@contextlib.contextmanager
def collectives_moving_own_data(world: int):
    """Inside: torch's functional collectives on this process's CPU and CUDA tensors complete at
    once and return *this rank's own data* as every peer's (an all-to-all returns its input, an
    all-gather repeats it, a sum is ``world`` times it), instead of what the fake group leaves:
    nothing written. For one process standing for rank 0 of ``world`` (the benchmark's emulated
    rank), whose kernels must see values like a real rank's: a GEMM or attention kernel over
    unwritten memory (zeros, stale values) runs at another speed than over real activations
    (measured: an emulated rank's matmuls above the GPU's matmul ceiling). Kernels registered on
    torch's own ``_c10d_functional`` ops for CPU and CUDA, which take precedence over their
    composite kernels; removed on exit. Not for real groups: every collective of the process is
    replaced while inside. Yields a Counter of the calls each kernel served."""
    import collections

    calls: collections.Counter = collections.Counter()

    def counted(name, fn):
        def kernel(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return kernel

    def to_all(x, output_split_sizes, input_split_sizes, group_name):
        rows = sum(output_split_sizes) if output_split_sizes else x.shape[0]
        if rows == x.shape[0]:
            return x.clone()
        if x.shape[0] == 0:
            return x.new_zeros((rows, *x.shape[1:]))
        return x.index_select(0, torch.arange(rows, device=x.device) % x.shape[0])

    def scale(op: str) -> int:
        return world if op.lower() == "sum" else 1

    def reduce(x, op, group_name):
        return x * scale(op) if scale(op) != 1 else x.clone()

    def reduce_(x, op, group_name):
        return x.mul_(scale(op)) if scale(op) != 1 else x

    def gather(x, group_size, group_name):
        return x.repeat(group_size, *[1] * (x.dim() - 1)) if x.dim() else x.repeat(group_size)

    def gather_out(x, group_size, group_name, *, out):
        return out.copy_(gather(x, group_size, group_name))

    def scatter(x, op, group_size, group_name):
        piece = x.narrow(0, 0, x.shape[0] // group_size)
        return piece * scale(op) if scale(op) != 1 else piece.clone()

    lib = torch.library.Library("_c10d_functional", "IMPL")
    kernels = {"all_to_all_single": to_all, "all_reduce": reduce, "all_reduce_": reduce_,
               "all_gather_into_tensor": gather, "all_gather_into_tensor_out": gather_out,
               "reduce_scatter_tensor": scatter}
    try:
        for name, fn in kernels.items():
            for key in ("CPU", "CUDA"):
                lib.impl(name, counted(name, fn), key)
        yield calls
    finally:
        lib._destroy()


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


INDUCTOR_CONFIG = "autosp.inductor_config"  # a partitioned graph's meta: Inductor settings for that graph alone
COLLECTIVE_BARRIERS = "autosp.collective_barriers"  # a forward graph's meta: compile under collective_fusion_barriers


def compile_partitioned(gm, example_inputs, compiler: str, forward_hook, backward_hook, inductor_config=None):
    """Compile like the ``compiler`` backend ("inductor" or "aot_eager"), with hooks on the graphs
    AOTAutograd's partitioner made: ``forward_hook(gm, inputs)`` and ``backward_hook(gm, inputs)``
    edit the graph in place and return the (possibly changed) example inputs. ``inductor_config``:
    ``torch._inductor.config`` values for both graphs (the backward compiles later, at the first
    backward: ``compile_fx``'s ``config_patches`` carries them there); either hook may add
    values for its graph alone in ``gm.meta[INDUCTOR_CONFIG]``. Inductor schedules the backward
    under ``attention_fusion_barriers``."""
    if compiler == "inductor":
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_settings
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner(g, inputs, **kwargs):
            if kwargs.get("is_backward"):
                inputs = backward_hook(g, inputs)
                with attention_fusion_barriers(), inductor_settings.patch(g.meta.get(INDUCTOR_CONFIG, {})):
                    return compile_fx_inner(g, inputs, **kwargs)
            if not kwargs.get("is_inference"):
                inputs = forward_hook(g, inputs)
            barriers = collective_fusion_barriers() if g.meta.get(COLLECTIVE_BARRIERS) else contextlib.nullcontext()
            with barriers, inductor_settings.patch(g.meta.get(INDUCTOR_CONFIG, {})):
                return compile_fx_inner(g, inputs, **kwargs)

        # AOTAutograd's cache keys on the graph before the hooks: a hit would return what an
        # earlier compile with other hooks made (Inductor's own cache keys on the hooked graphs).
        with functorch_config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, inner_compile=inner, config_patches=inductor_config or None)
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


def attention_fusion_barriers():
    """A context in which Inductor's scheduler does not fuse two kernels that lie on either side
    of an attention backward (horizontal fusions: kernels that only share an input).

    Why: a fused kernel runs where the later of its parts can run, and Inductor orders the graph
    again after fusing, so what the earlier part reads stays alive through the attention backward
    between them, the peak of a long-sequence backward. Seen in Inductor's code for
    ``recompute="attention_out"``: the weight gradient of the MLP's input norm (it reads the layer
    input ``x`` and the recomputed ``o_proj`` output) was fused with the attention input norm's
    (which reads ``x``) across the attention backward; the ``o_proj`` output and input (two
    ``[S/P, hidden]`` values) were then held through it, and the ``o_proj`` weight gradient ran
    after it. Inductor's own guard (``are_long_distant_nodes``) counts the distance in kernels, and
    an attention backward is one kernel. The hook is ``InductorChoices.can_fuse_horizontal``, the
    extension point Inductor offers for fusion heuristics, installed for the current thread;
    ``config.inductor_choices_class`` names it too, so that Inductor's cache of compiled graphs
    keys on it (where this torch has that option)."""
    return _install(_attention_barriers_class())


def _attention_barriers_class():
    """The ``InductorChoices`` subclass of ``attention_fusion_barriers`` (None where this torch's
    choices have no ``can_fuse_horizontal``)."""
    return _barriers_class("AttentionBarriers", "attention_fusion_barriers", crosses_attention_backward)


def collective_fusion_barriers():
    """A context in which Inductor's scheduler does not fuse two kernels that lie on either side
    of an all-to-all's issue (horizontal fusions: kernels that only share an input).

    Why: autosp/passes/split_projections.py puts this rank's own q/k/v chunk after the issue of
    the all-to-all of the peers' chunks, to be made while they cross. The own chunk's RoPE reads
    the same cos and sin as the peers' chunks' RoPE, so Inductor fused the two kernels (seen in
    its CPU code for a tiny Llama), and the fused kernel, with the own chunk's projection it
    reads, ran before the issue: nothing was left to overlap. Installed like
    ``attention_fusion_barriers``."""
    return _install(_barriers_class("CollectiveBarriers", "collective_fusion_barriers", crosses_collective_issue))


def crosses_collective_issue(scheduler, node1, node2) -> bool:
    """Whether fusing two scheduler nodes would join kernels on either side of an all-to-all's
    issue (a collective kernel whose op is ``all_to_all_single``, or ``peer_exchange_start``)."""
    return _crosses(scheduler, node1, node2, "_autosp_collective_orders", _is_all_to_all_kernel)


def _is_all_to_all_kernel(snode) -> bool:  # NCCL's, or the copy engines' (kernels/peer_exchange.py)
    name = _kernel_name(snode)
    return "all_to_all_single" in name or "peer_exchange_start" in name


def _kernel_name(snode) -> str:
    ir_node = getattr(snode, "node", None)
    return str(getattr(ir_node, "op_overload", None) or getattr(ir_node, "python_kernel_name", None) or "")


def _install(barriers):
    """Install an ``InductorChoices`` class for the current thread (and name it in Inductor's config,
    where this torch has ``inductor_choices_class``, so that Inductor's cache keys on it)."""
    from torch._inductor import config
    from torch._inductor.virtualized import V

    stack = contextlib.ExitStack()
    if barriers is None:
        return stack
    if hasattr(config, "inductor_choices_class"):
        stack.enter_context(config.patch(inductor_choices_class=barriers))
    stack.enter_context(V.set_choices_handler(barriers()))
    return stack


def _crosses(scheduler, node1, node2, cache: str, is_barrier) -> bool:
    """Whether fusing two scheduler nodes would join kernels on either side of a barrier kernel:
    more of them lie between the two nodes' first and last original positions than inside either."""
    barriers = getattr(scheduler, cache, None)
    if barriers is None:
        barriers = sorted(n.min_order for n in scheduler.nodes if is_barrier(n))
        setattr(scheduler, cache, barriers)
    if not barriers:
        return False

    def inside(lo, hi):
        return sum(lo < b < hi for b in barriers)

    lo, hi = min(node1.min_order, node2.min_order), max(node1.max_order, node2.max_order)
    return inside(lo, hi) > inside(node1.min_order, node1.max_order) + inside(node2.min_order, node2.max_order)


@functools.cache
def _barriers_class(name: str, key: str, crosses):
    """An ``InductorChoices`` subclass whose ``can_fuse_horizontal`` refuses what ``crosses``
    says crosses a barrier (None where this torch's choices have no ``can_fuse_horizontal``)."""
    from torch._inductor.choices import InductorChoices

    if not hasattr(InductorChoices, "can_fuse_horizontal"):
        return None

    def can_fuse_horizontal(scheduler, node1, node2, shared_data_score):
        if crosses(scheduler, node1, node2):
            return False
        return InductorChoices.can_fuse_horizontal(scheduler, node1, node2, shared_data_score)

    def uuid(self) -> str:  # Inductor's cache key for a choices class
        return f"autosp.{key}.1"

    cls = type(name, (InductorChoices,), {"can_fuse_horizontal": staticmethod(can_fuse_horizontal), "uuid": uuid})
    # named as a global of this module: Inductor pickles the config, this class with it, by reference
    cls.__module__, cls.__qualname__ = __name__, name
    globals()[name] = cls
    return cls


def crosses_attention_backward(scheduler, node1, node2) -> bool:
    """Whether fusing two scheduler nodes would join kernels on either side of an attention
    backward (an extern kernel whose op name has "attention" and "backward"): more of them lie
    between the two nodes' first and last original positions than inside either node."""
    return _crosses(scheduler, node1, node2, "_autosp_attention_backward_orders", _is_attention_backward_kernel)


def _is_attention_backward_kernel(snode) -> bool:
    name = _kernel_name(snode)
    return "attention" in name and "backward" in name


def written_arguments(op) -> list[tuple[int, str]] | None:
    """``(position, name)`` of each argument an aten or custom op overload writes, by its schema
    (``aten.fill_.Scalar``: ``[(0, "self")]``; ``aten.add.out``: ``[(3, "out")]``); None when ``op``
    is not an overload (a Python function, a method name, an overload packet)."""
    if not isinstance(op, torch._ops.OpOverload):
        return None
    return [(i, a.name) for i, a in enumerate(op._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


def may_reinplace(node) -> bool:
    """Whether Inductor's post-grad reinplacing may turn this functional op into a write into its
    input's memory (``index_put`` -> ``index_put_`` where the input is dead after it; the
    scatters, ``all_reduce``, the foreach ops): its table, ``fx_passes.reinplace``, and the view
    scatters it turns into one of its entries."""
    from torch._inductor.fx_passes import reinplace

    target = getattr(node, "target", None)
    return target in reinplace.inplaceable_ops or target in reinplace.inplaceable_foreach_ops or target in (
        torch.ops.aten.slice_scatter.default, torch.ops.aten.select_scatter.default,
        torch.ops.aten.as_strided_scatter.default, torch.ops.aten.diagonal_scatter.default)


def has_side_effect(op):
    """Mark ``op`` (a graph target) as run for its side effect, so that FX's, AOTAutograd's and
    Inductor's dead-code elimination keep its calls (``torch.fx.node.has_side_effect``)."""
    import torch.fx.node

    return torch.fx.node.has_side_effect(op)


def realize_to_strides(node) -> None:
    """Make Inductor put the value of FX ``node`` in one buffer with the strides of its
    ``meta["val"]`` (a copy only where its own layout differs), read so by every user: the
    graph lowering's ``inductor_realize_to_strides`` node flag. Ops a pass inserts get no layout
    constraint of their own, and a layout tag would copy a view once for each op that reads it."""
    node.meta["inductor_realize_to_strides"] = True


def assert_async(condition: torch.Tensor, message: str) -> None:
    """Fail the stream (not the host) when the one-element ``condition`` is False: a check that
    costs no host synchronization (``torch._assert_async``)."""
    torch._assert_async(condition, message)


# The two other concepts, one file each; imported here so every caller reads them as _torch_private.X.
from autosp._torch_private.attention import (  # noqa: E402,F401
    cpu_flash_attention_lse,
    cpu_flash_attention_lse_backward,
    cudnn_attention_lse,
    cudnn_attention_lse_backward,
    efficient_attention_lse,
    efficient_attention_lse_backward,
    flash_attention_lse,
    flash_attention_lse_backward,
    sdpa_backend_choice,
)
from autosp._torch_private.peer_memory import (  # noqa: E402,F401
    WAIT_EQ,
    WAIT_GEQ,
    PeerBuffers,
    _stream_memops,
    lazy_module_loading,
    own_stream,
    stream_wait_value32,
    stream_write_value32,
)
