"""offload: the activations the layers keep for the backward wait in host memory, not on the GPU.

The two passes here run after AOTAutograd has split the region into a forward and a backward
graph (the backend calls them on the partitioned graphs, see ``autosp.backend``): they are the
only passes that see what the partitioner decided to save. ``Config.offload`` turns them on,
and so does the memory planner (``recompute="auto"``) when its plan offloads; they need the
per-layer marks (``ac_graph_id``) of ``Config.recompute``, which say which layer a saved
tensor belongs to.

``offload_saved_pass`` (forward) picks the saved tensors to offload: made inside a repeated
layer or used by one (the embedding's output), not needed by the last layer (its backward runs first, so what it needs stays
resident; ``Config.offload_keep_layers`` keeps more of the last layers resident), at least 1/16
the size of the largest saved activation (small tensors are not worth a transfer), dense. Host
memory is bounded (``Config.host_memory_gb``, by default the host's memory shared by its
processes): the first layers go to the host as far as their pinned blocks fit it, the later
layers keep theirs on the device, and the report says which (``memory_plan.offloaded_layers``). Each picked output of the forward is replaced by its host copy::

    add_47 = ...; ...; return (loss, ..., add_47, ...)     # add_47: layer 3's output, saved
    ->
    add_47 = ...
    offload = torch.ops.autosp.offload(add_47)             # right after it is made
    ...; return (loss, ..., offload, ...)                  # AOTAutograd saves the host copy

``reload_saved_pass`` (backward) brings each one back right before its first use, and starts
the copies of later ones (prefetch): each tensor's copy starts at the latest earlier reload from which
the compute before its use hides it (matmuls and attention estimated at the device's matmul
ceiling; copies at ``memory_plan.HOST_BYTES_PER_S``, queued one after another on the transfer
stream), but never more than a layer ahead. So a tensor waits on the device early only as long as its copy needs: with
``"blocks"`` at long sequences the layer input for attention's backward is copied during the
MLP block's backward, and the next layer's attention-block output during attention's, one
tensor ahead, where a whole layer ahead held both through the attention backward, the step's
peak. Where nothing can hide a copy (short sequences, a slow host link) the next layer's tensors
start at the first reload of this one::

    add_47 = placeholder; ... use(add_47)
    ->
    add_47 = placeholder                            # now a host tensor
    reload = torch.ops.autosp.reload(add_47, cuda:0, [add_31])   # starts add_31's copy, used later
    ... use(reload)

A tensor read again only after a long stretch of compute (with ``"attention_out"``, a layer's
input and attention's outputs make the MLP block's input first and are read again after the MLP
block's backward) is reloaded a second time for its later uses where that compute is at least
``RELOAD_AGAIN`` times its copy (``use_groups``), rather than held through the stretch; its
second copy starts after its first reload took the first. The first offloaded layer the
backward reaches is copied when it is reached (one stall a step, a few milliseconds). Kernels and streams: ``autosp/kernels/host_offload.py``.

A copy to the host reads its device tensor on the transfer stream while the compute stream goes
on, so nothing may write that memory until the copy has read it. The caching allocator keeps
that promise (``record_stream``), Inductor's own memory reuse does not: by default it hands a
dead buffer to a later buffer of the same size (``buf9 = buf4; del buf4  # reuse``) or lets a
kernel write its output over an input it reads last (in-place buffers), and the compute stream
then overwrote an activation whose copy had not started (the host got the new data; found as a
wrong layer-0 gradient in the NCCL parity run of 2026-11-30, chunked attention streaming its
chunks). The backend compiles a forward graph that copies to the host (``copies_to_host``)
with both off (``HOST_COPY_SETTINGS``), so each dead buffer goes back to the allocator; and a
value that a later op of the graph may be turned into an in-place write on (Inductor's
reinplacing of ``index_put``, scatters, ``all_reduce``: ``_torch_private.may_reinplace``) is
kept on the device. (Chunked attention's streamed q, k, v, o are not checked so; no model
tested writes into attention's inputs or output after it.)
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.fx as fx

from autosp import _torch_private
from autosp.graph_utils import tensor_bytes, val
from autosp.kernels import host_offload
from autosp.kernels.chunked_attention import CHUNKED_ATTENTION
from autosp.kernels.pinned_pool import block_bytes
from autosp.passes import memory_plan
from autosp.passes.memory_plan import HOST_BYTES_PER_S, MIN_FRACTION, MIN_STRETCH_S, PEAK_FLOPS
from autosp.plan import Plan

RELOAD_AGAIN = 2  # reload again for later uses when the compute before them is 2x the copy


class Offloaded(NamedTuple):
    layer: int  # the layer whose backward needs it first
    shape: tuple
    dtype: torch.dtype


@dataclass
class OffloadRecord:
    """One region's offload: the plan it reports to, and what the forward offloaded (saved value
    name -> its layer, shape and dtype) for the backward."""

    plan: Plan
    values: dict[str, Offloaded] = field(default_factory=dict)
    bytes: int = 0
    pinned_bytes: int = 0  # the pinned pool's blocks for them (whole pages)
    kept_bytes: int = 0


def offload_saved_pass(gm: fx.GraphModule, example_inputs, *, cfg, record: OffloadRecord) -> fx.GraphModule:
    """Replace the forward's saved layer activations by host copies (``autosp::offload``)."""
    plan = record.plan
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outs = list(output.args[0])
    first_saved = _torch_private.num_forward_returns()
    if first_saved is None:
        return gm  # inference: nothing is saved
    layers = {n: n.meta["ac_graph_id"] for n in gm.graph.nodes if n.meta.get("ac_graph_id") is not None}
    if not layers:
        plan.note("offload: no layer marks in the forward graph (recompute found no repeated layers); nothing offloaded")
        return gm
    # The last layers keep theirs on the device: the last one's backward runs first (nothing to
    # overlap its reload with), and Config.offload_keep_layers may keep more (host memory bound).
    resident = set(sorted(set(layers.values()))[-cfg.offload_keep_layers:])
    saved = [(i, n) for i, n in enumerate(outs) if i >= first_saved and isinstance(n, fx.Node)
             and isinstance(val(n), torch.Tensor) and not _host_copy(n)]
    # The largest activation, not the largest saved value: at a short sequence the weights
    # (saved for their gradients) outweigh a layer's activations and would set the bar.
    largest = max((tensor_bytes(val(n)) for _, n in saved if n.op == "call_function" and not _input_view(n)), default=0)
    by_layer: dict[int, list[tuple[int, fx.Node]]] = {}
    written = []  # kept: a later op may be made to write into them (see the module docstring)
    for i, node in saved:
        layer = memory_plan.first_reader(node, layers)
        size = tensor_bytes(val(node))
        if (layer < 0 or layer in resident or node.op != "call_function" or size == 0 or size * MIN_FRACTION < largest
                or not host_offload.is_dense(val(node)) or _input_view(node)):
            record.kept_bytes += size
            continue
        if _written_later(node):
            written.append(node.name)
            record.kept_bytes += size
            continue
        by_layer.setdefault(layer, []).append((i, node))
    if written:
        plan.note(f"offload: {len(written)} saved tensors stay on the device because a later op may be made to write "
                  f"into them in place, which a copy to the host still reading them would race ({', '.join(written[:4])}"
                  + (", ...)" if len(written) > 4 else ")"))
    # Host memory bounds it: the first layers go, as many as their pinned blocks fit the budget.
    budget = memory_plan.host_budget(cfg.host_memory_gb, cfg.host_processes)
    pinned = {layer: sum(block_bytes(tensor_bytes(val(n))) for _, n in nodes) for layer, nodes in by_layer.items()}
    moved = set(memory_plan.offloaded_layers(pinned, budget))
    held = sorted(set(by_layer) - moved)
    held_bytes = sum(tensor_bytes(val(n)) for layer in held for _, n in by_layer[layer])
    record.kept_bytes += held_bytes
    if held:
        plan.note(f"offload: the host budget ({budget / 2**30:.3g} GiB of pinned memory a process, "
                  f"Config.host_memory_gb) holds {len(moved)} of {len(by_layer)} layers' saved tensors; layers "
                  f"{held[0]}-{held[-1]} keep theirs on the device ({held_bytes / 2**30:.3g} GiB)")
    plan.memory["offloaded_layers"] = sorted(moved)  # in the plan's fingerprint: every rank must agree
    for layer in sorted(moved):
        for i, node in by_layer[layer]:
            # Right after the value is made: the copy overlaps the rest of the forward and the device
            # memory is free once the forward's last use of it and the copy are done. (Placed at
            # the output, every layer's copy would start at the end of the forward, with all of
            # them on the device until then: the forward's peak unchanged.)
            with gm.graph.inserting_after(node):
                host = gm.graph.call_function(torch.ops.autosp.offload.default, (node,))
            host.meta["val"] = _on_host(val(node))
            outs[i] = host
            record.values[node.name] = Offloaded(layer, tuple(val(node).shape), val(node).dtype)
            record.bytes += tensor_bytes(val(node))
    record.pinned_bytes = sum(pinned[layer] for layer in moved)
    if not record.values:
        plan.note("offload: nothing offloaded" + ("" if held else " (no saved tensor qualified: all are in the last "
                                                              "layers, outside the layers, or small)"))
        return gm
    output.args = (tuple(outs),)
    gm.graph.lint()
    gm.recompile()
    n_layers = len({v.layer for v in record.values.values()})
    plan.note(f"offload: {len(record.values)} saved tensors of {n_layers} layers to pinned host memory, "
              f"{record.bytes / 2**30:.2f} GiB a step in {record.pinned_bytes / 2**30:.2f} GiB of pinned blocks; "
              f"{record.kept_bytes / 2**30:.2f} GiB of saved tensors stay "
              f"on the device (the last {len(resident)} layer(s)" + (", the layers the host budget leaves" if held else "")
              + ", tensors outside the layers, small ones)")
    return gm


def _input_view(node: fx.Node) -> bool:
    """Whether a value is a view of a graph input (a parameter read through ``mean_grad``, say):
    it holds no memory of its own to free, and copying it would move weights every step."""
    while isinstance(node.target, torch._ops.OpOverload) and node.target.is_view and node.args:
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op == "placeholder"


def reload_saved_pass(gm: fx.GraphModule, example_inputs: list, *, cfg, record: OffloadRecord) -> list:
    """Reload the offloaded placeholders before first use, each copy started ahead by
    ``prefetch_points``; returns
    the example inputs with the offloaded ones on the host."""
    if not record.values:
        return example_inputs
    placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # The partitioner names a saved value's backward input after the forward node (its own
    # link between the two graphs); shapes and dtypes must agree too.
    offloaded = [n for n in placeholders if n.name in record.values]
    if len(offloaded) != len(record.values):
        missing = sorted(set(record.values) - {n.name for n in offloaded})
        raise RuntimeError(f"autosp offload: the backward graph has no input for offloaded values {missing}")
    example_inputs = list(example_inputs)
    devices = {}
    for ph in offloaded:
        fake, want = val(ph), record.values[ph.name]
        if (tuple(fake.shape), fake.dtype) != (want.shape, want.dtype):
            raise RuntimeError(f"autosp offload: backward input {ph.name} is {list(fake.shape)} {fake.dtype}, the "
                               f"offloaded forward value {list(want.shape)} {want.dtype}")
        devices[ph] = fake
        ph.meta["val"] = _on_host(fake)  # what the backward is now given: the host copy
        example_inputs[placeholders[ph]] = ph.meta["val"]
    seconds = cumulative_seconds(gm.graph)
    # One reload per group of uses: a tensor read again only after a long stretch of compute
    # (a layer's MLP backward between the recomputation of its input and attention's backward)
    # is reloaded again for the later uses rather than held through the stretch.
    groups = []  # (placeholder, its uses in this group), in the order of the groups' first uses
    for ph in offloaded:
        if ph.users:  # before any reload is added
            groups += [(ph, g) for g in use_groups(list(ph.users), order, seconds,
                                                   tensor_bytes(devices[ph]) / HOST_BYTES_PER_S)]
    groups.sort(key=lambda g: order[g[1][0]])
    previous: dict[fx.Node, int] = {}
    not_before = []
    for i, (ph, _) in enumerate(groups):  # a tensor's next copy starts after its last reload took the one before
        not_before.append(previous[ph] + 1 if ph in previous else 0)
        previous[ph] = i
    issue = prefetch_points([order[uses[0]] for _, uses in groups],
                            [record.values[ph.name].layer for ph, _ in groups],
                            [tensor_bytes(devices[ph]) / HOST_BYTES_PER_S for ph, _ in groups],
                            seconds, not_before)
    prefetch: list[list[fx.Node]] = [[] for _ in groups]
    for (ph, _), at in zip(groups, issue, strict=True):
        if at is not None:
            prefetch[at].append(ph)
    for (ph, uses), ahead in zip(groups, prefetch, strict=True):
        fake = devices[ph]
        with gm.graph.inserting_before(uses[0]):
            back = gm.graph.call_function(torch.ops.autosp.reload.default, (ph, fake.device, ahead))
        back.meta["val"] = fake
        for user in uses:  # not the reloads that prefetch it: they take the host tensor
            user.replace_input_with(ph, back)
    again = len(groups) - len({ph for ph, _ in groups})
    if again:
        record.plan.note(f"reload_saved: {again} saved tensors reloaded a second time for their later uses "
                         f"(more than {RELOAD_AGAIN}x their copy time of compute after the earlier ones)")
    gm.graph.lint()
    gm.recompile()
    return example_inputs


def use_groups(users: list[fx.Node], order: dict[fx.Node, int], seconds: list[float],
               copy_s: float) -> list[list[fx.Node]]:
    """A reloaded tensor's uses in graph order, split where the estimated compute between two of
    them is at least ``RELOAD_AGAIN`` times the tensor's copy and ``MIN_STRETCH_S`` (``seconds``:
    ``cumulative_seconds``)."""
    uses = sorted(users, key=order.get)
    out = [[uses[0]]]
    for a, b in itertools.pairwise(uses):
        if seconds[order[b]] - seconds[order[a] + 1] >= max(RELOAD_AGAIN * copy_s, MIN_STRETCH_S):
            out.append([])
        out[-1].append(b)
    return out


def prefetch_points(uses: list[int], layers: list[int], copy_s: list[float],
                    seconds: list[float], not_before: list[int] | None = None) -> list[int | None]:
    """Where each reload's copy starts: the index (reloads in the order of their first uses, at
    graph positions ``uses``) of the reload that prefetches it, or None (copied when
    reached: the first one). The latest earlier reload from which the copy, queued behind the
    ones before it on the one transfer stream (``copy_s`` seconds each), ends before the use
    (``seconds[i]``: estimated compute time of the graph's first i nodes); never earlier than the
    first reload of the layer the backward reaches before this one (a layer ahead at most: what a
    copy that nothing hides gets), nor than the copy before it (copies start in order of use),
    nor than ``not_before[i]`` (a tensor reloaded twice: after the reload that took its first
    copy; None when that is this reload itself)."""
    first_of_layer: dict[int, int] = {}
    for i, layer in enumerate(layers):
        first_of_layer.setdefault(layer, i)
    order = list(dict.fromkeys(layers))  # layers in the order the backward reaches them
    points: list[int | None] = [None]
    # When the transfer stream is done with what is queued. The first copy starts at its use and
    # the compute waits for it: it shifts the timeline, not this copy's place in it.
    free = seconds[uses[0]]
    last = 0  # the reload at which the latest copy so far starts
    for i in range(1, len(uses)):
        k = order.index(layers[i])
        earliest = max(first_of_layer[order[k - 1]] if k > 0 else 0, last, not_before[i] if not_before else 0)
        if earliest >= i:  # nothing earlier may start it: copied when reached
            points.append(None)
            free = max(seconds[uses[i]], free) + copy_s[i]
            last = i
            continue
        at = next((j for j in range(i - 1, earliest - 1, -1)
                   if max(seconds[uses[j]], free) + copy_s[i] <= seconds[uses[i]]), earliest)
        points.append(at)
        free = max(seconds[uses[at]], free) + copy_s[i]
        last = at
    return points


def cumulative_seconds(graph: fx.Graph, seconds_of=None) -> list[float]:
    """``out[i]``: the estimated compute time of the graph's first i nodes (each node's by
    ``seconds_of``, default :func:`compute_seconds`)."""
    seconds_of = seconds_of or compute_seconds
    out = [0.0]
    for n in graph.nodes:
        out.append(out[-1] + seconds_of(n))
    return out


def compute_seconds(node: fx.Node) -> float:
    """Estimated seconds of a matmul or attention call (forward or backward) of the backward
    graph, at the device's matmul ceiling; 0 for the other ops (memory-bound, short)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return 0.0
    name = target._overloadpacket.__name__
    out = val(node)
    if name in ("mm", "bmm", "addmm", "baddbmm") and isinstance(out, torch.Tensor):
        a = val(node.args[1] if name in ("addmm", "baddbmm") else node.args[0])
        return 2 * out.numel() * a.shape[-1] / PEAK_FLOPS
    if "attention" in name:  # [B, N, S, H] operands; causal: 4 B N S S H / 2, backward 2.5x
        x = max((val(a) for a in node.all_input_nodes if isinstance(val(a), torch.Tensor) and val(a).dim() == 4),
                key=lambda t: t.numel(), default=None)
        flops = 0 if x is None else 2 * x.numel() * x.shape[-2]
        return flops * (2.5 if "backward" in name else 1.0) / PEAK_FLOPS
    return 0.0


def copies_to_host(gm: fx.GraphModule) -> bool:
    """Whether a forward graph starts copies to the host: ``autosp::offload`` calls, or chunked
    attention streaming its chunks (its ``offload`` argument)."""
    return any(n.op == "call_function" and (n.target is torch.ops.autosp.offload.default
                                            or (n.target is CHUNKED_ATTENTION and n.args[6]))
               for n in gm.graph.nodes)


# Inductor settings for a graph that copies to the host: no buffer handed on while a copy may
# still read it (see the module docstring).
HOST_COPY_SETTINGS = {"allow_buffer_reuse": False, "inplace_buffers": False}


def _written_later(node: fx.Node) -> bool:
    """Whether an op reading ``node`` (or a view of it) may be made to write into it in place."""
    seen, frontier = {node}, [node]
    while frontier:
        for user in frontier.pop().users:
            if _torch_private.may_reinplace(user):
                return True
            if user not in seen and isinstance(val(user), torch.Tensor) and val(user)._is_view():
                seen.add(user)
                frontier.append(user)
    return False


def _host_copy(node: fx.Node) -> bool:
    """Whether a saved value is already a host copy: an ``autosp::offload`` or one of the host
    chunks chunked attention returns (its output 2), possibly through getitem/detach."""
    while node.op == "call_function" and node.target in (operator.getitem, torch.ops.aten.detach.default):
        src = node.args[0]
        if node.target is operator.getitem and isinstance(src, fx.Node) and src.target is CHUNKED_ATTENTION:
            return node.args[1] == 2
        node = src
    return node.op == "call_function" and node.target is torch.ops.autosp.offload.default


def _on_host(fake: torch.Tensor) -> torch.Tensor:
    """The fake value of ``fake``'s host copy: same shape, strides and dtype, on the CPU."""
    with _torch_private.fake_mode_of([fake]):
        return torch.empty_strided(fake.shape, fake.stride(), dtype=fake.dtype, device="cpu")
