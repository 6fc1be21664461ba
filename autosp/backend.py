"""The Dynamo backend: resolve the group, run the pipeline, hand the graph to the inner compiler.

``torch.compile(model, backend="autosp", options={...})`` reaches :func:`autosp_backend`
through the ``torch_dynamo_backends`` entry point; ``autosp.backend(**options)`` returns the
same backend with the options bound. Each compiled region (one Dynamo graph; a graph break
makes several) is handled on its own and gets its own plan.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch.distributed as dist
import torch.fx as fx

from autosp import _torch_private, collectives
from autosp.config import Config
from autosp.passes._attention import attention_kernel_context
from autosp.passes._context import SEQ_DIM
from autosp.passes.defer_weight_grads import defer_weight_grads_pass
from autosp.passes.grad_reduce import sink_grad_waits
from autosp.passes.offload import (
    HOST_COPY_SETTINGS,
    OffloadRecord,
    copies_to_host,
    offload_saved_pass,
    reload_saved_pass,
)
from autosp.passes.output_layout import OUTPUT_SPECS
from autosp.passes.peer_exchange import peer_exchange_pass
from autosp.passes.rematerialize import rematerialize_pass
from autosp.passes.sum_products import sum_products_pass
from autosp.pipeline import PassConfig, run_passes
from autosp.plan import Plan
from autosp.report import save_report
from autosp.runtime import CompiledRegion

log = logging.getLogger(__name__)


def backend(**options: Any):
    """A Dynamo backend with these options bound: ``torch.compile(m, backend=autosp.backend(...))``."""
    cfg = Config.from_options(options)
    return functools.partial(_compile_region, cfg=cfg)


def autosp_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None, **kwargs: Any):
    """The registered backend ``"autosp"``; ``options`` are the fields of :class:`autosp.Config`."""
    kwargs.pop("mode", None)
    kwargs.pop("dynamic", None)
    cfg = Config.from_options(options, **kwargs)
    return _compile_region(gm, example_inputs, cfg=cfg)


def resolve_group(cfg: Config):
    """The sequence-parallel group, its size and this rank's index in it (None, 1, 0 without one)."""
    if cfg.group is not None:
        group = _torch_private.resolve_group(cfg.group) if isinstance(cfg.group, str) else cfg.group
    elif cfg.mesh is not None:
        group = cfg.mesh.get_group(cfg.sp_dim) if cfg.sp_dim is not None else cfg.mesh.get_group()
    elif dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    else:
        return None, 1, 0
    return group, dist.get_world_size(group), dist.get_rank(group)


# The gradient communicator of each sequence-parallel group: group name -> (the group, the
# gradient group's name or None), made once per process like the groups themselves (a second
# communicator is a second NCCL stream). The group itself is kept to tell a group made again
# under the same name (after destroy_process_group) from the one the entry was made for.
_GRADIENT_GROUPS: dict[str, tuple[Any, str | None]] = {}


def gradient_group_name(group) -> str | None:
    """The name of a second process group over ``group``'s ranks, for the gradient all-reduces of
    ``Config.overlap_grad_reduce``; None where the ranks cannot make one safely.

    A process group runs its collectives one after another on one stream: on the
    sequence-parallel group, a layer's gradient all-reduces would go ahead of the all-to-all
    that the next attention backward waits for, and the device would idle behind them
    (measured: 0.6 ms a layer at 16K on 2x H200). On their own communicator they run beside the
    all-to-alls. The group's ranks alone make it, once (every rank compiles the region), after
    agreeing on the name torch will give it: ranks that have made different process groups
    before would name it differently and wait for each other for ever. Then (None) the
    gradients share the sequence-parallel communicator, and the plan says so."""
    name = group.group_name
    cached = _GRADIENT_GROUPS.get(name)
    if cached is None or cached[0] is not group:
        ranks = dist.get_process_group_ranks(group)
        names: list[str | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(names, _torch_private.local_group_name(ranks), group=group)
        made = dist.new_group(ranks, use_local_synchronization=True).group_name if len(set(names)) == 1 else None
        cached = _GRADIENT_GROUPS[name] = (group, made)
    return cached[1]


def _grad_reduce_on(cfg: Config) -> bool:
    """Whether the compiled backward averages the gradients itself (autosp/passes/grad_reduce.py)."""
    return cfg.overlap_grad_reduce and "grad_reduce" not in cfg.disable_passes


def plan_region(gm: fx.GraphModule, example_inputs: list[Any], cfg: Config) -> tuple[fx.GraphModule, Plan]:
    """Run the pipeline on one region; returns the rewritten graph and its plan."""
    group, world, rank = resolve_group(cfg)
    plan = Plan(region=_torch_private.compile_id(), world=world, rank=rank, options=cfg.summary())
    grads = _grad_reduce_on(cfg) and world > 1
    grad_group = gradient_group_name(group) if grads else None
    if grads and grad_group is None:
        plan.note("grad_reduce: the group's ranks have made different process groups before, so torch would name a "
                  "second group over them differently on each: the gradient all-reduces share the "
                  "sequence-parallel communicator")
    pcfg = PassConfig(options=cfg, group_name=group.group_name if group is not None else None, world=world, rank=rank,
                      grad_group_name=grad_group)
    gm = run_passes(gm, example_inputs, pcfg, plan)
    return gm, plan


def _compile_region(gm: fx.GraphModule, example_inputs: list[Any], *, cfg: Config):
    group, _, _ = resolve_group(cfg)
    gm, plan = plan_region(gm, example_inputs, cfg)
    log.info("autosp region %s: %d attention sites rewritten, %d collectives, %d fallbacks", plan.region,
             sum(s.rewritten for s in plan.sites), len(plan.collectives), len(plan.fallbacks))
    kernel_ctx = functools.partial(attention_kernel_context, cfg.attention)
    with kernel_ctx():
        compiled = _inner_compile(gm, example_inputs, cfg, plan, group.group_name if group is not None else None)
    save_report(plan)  # after compiling: the plan has the forward's offload notes too
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    seq_source = next(((i, n.meta[SEQ_DIM]) for i, n in enumerate(placeholders) if SEQ_DIM in n.meta), None)
    return CompiledRegion(compiled, plan, group if plan.active else None, gm.meta.get(OUTPUT_SPECS), seq_source, kernel_ctx)


def _inner_compile(gm: fx.GraphModule, example_inputs: list[Any], cfg: Config, plan: Plan, group_name: str | None):
    """The inner compiler; with ``Config.offload`` (or an offload the memory planner chose), with
    gradient all-reduces in the graph and with Inductor settings, it goes through the partitioned
    path: passes run on the graphs AOTAutograd's partitioner made."""
    if cfg.compiler == "eager":
        return gm.forward
    offload = bool(cfg.offload or plan.memory.get("offload"))
    grad_waits = _grad_reduce_on(cfg)
    inductor_config = {} if cfg.buffer_reuse else {"allow_buffer_reuse": False}
    remat = cfg.recompute != "none" and "rematerialize" not in cfg.disable_passes
    sums = cfg.recompute != "none" and "sum_products" not in cfg.disable_passes
    defer = plan.world > 1 and "defer_weight_grads" not in cfg.disable_passes
    split = any(n.target is collectives.exchange_start for n in gm.graph.nodes)
    peer = cfg.exchange == "peer_copy" and plan.world > 1 and group_name is not None and "peer_exchange" not in cfg.disable_passes
    if not (offload or grad_waits or inductor_config or remat or sums or defer or peer):
        return _torch_private.lookup_backend(cfg.compiler)(gm, example_inputs)
    record = OffloadRecord(plan)

    def forward_hook(g, inputs):
        if split:  # the own q/k/v chunk stays after the issue of the peers' (passes/split_projections.py)
            g.meta[_torch_private.COLLECTIVE_BARRIERS] = True
        if offload:
            offload_saved_pass(g, inputs, cfg=cfg, record=record)
        if copies_to_host(g) and cfg.compiler == "inductor":  # no buffer handed on while a copy may read it
            g.meta[_torch_private.INDUCTOR_CONFIG] = dict(HOST_COPY_SETTINGS)
            plan.note("offload: the forward copies to the host, so Inductor compiles it without its buffer reuse and "
                      "in-place buffers (a copy reads its tensor on the transfer stream after the call returns)")
        if peer:
            _peer_exchange(g, "forward")
        return inputs

    def _peer_exchange(g, which: str) -> None:
        done, why = peer_exchange_pass(g, group_name, plan.world, backward=which == "backward",
                                       timeout=cfg.exchange_timeout_s)
        if done:  # in this order: Inductor's peak-memory order could start an exchange after a later one ends
            _in_graph_order(g)
        plan.note(f"peer_exchange: {done} all-to-alls of the {which} carried by the copy engines"
                  + (f" (none: {why}; NCCL carries them)" if why else ""))

    def backward_hook(g, inputs):
        if remat:  # first: a value made again from an offloaded input reads it where the reload goes
            again = rematerialize_pass(g, frozenset(record.values))
            plan.note(f"rematerialize: {len(again)} values of the backward computed again after the attention "
                      f"backward (or long compute) they were held through"
                      + (f" ({', '.join(again[:4])}, ...)" if again else ""))
        if offload:
            inputs = reload_saved_pass(g, inputs, cfg=cfg, record=record)
        if sums:
            plan.note(f"sum_products: {sum_products_pass(g)} sums of matmul products in the backward made addmm chains")
        in_order = False  # compiled in this graph's order: Inductor's peak-memory order would undo the moves
        if grad_waits:
            moved = sink_grad_waits(g)
            plan.note(f"sink_grad_waits: {moved} gradient all-reduce waits moved to the end of the backward")
            in_order |= bool(moved)
        if defer:  # after sink_grad_waits: a moved weight gradient's all-reduce is put after the window
            mms, windows, heads = defer_weight_grads_pass(g)
            plan.note(f"defer_weight_grads: {mms} weight-gradient matmuls moved into the waits of {windows} "
                      f"collectives of the backward ({heads} windows' first matmul split to start with a short head)")
            in_order |= bool(mms)
        if in_order:
            _in_graph_order(g)
        if peer:
            _peer_exchange(g, "backward")
        save_report(plan)  # again: the backward compiles at the first backward, after the report was written
        return inputs

    return _torch_private.compile_partitioned(gm, example_inputs, cfg.compiler, forward_hook, backward_hook,
                                              inductor_config)


def _in_graph_order(g: fx.GraphModule) -> None:
    """Inductor compiles this partitioned graph in its own order (no peak-memory reordering),
    beside whatever other Inductor settings the graph already asks for."""
    g.meta[_torch_private.INDUCTOR_CONFIG] = {**g.meta.get(_torch_private.INDUCTOR_CONFIG, {}),
                                              "reorder_for_peak_memory": False}
