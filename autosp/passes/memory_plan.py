"""memory_plan: what each repeated layer keeps, recomputes or leaves on the host, chosen under a
memory budget by a minimum cut (networkx). ``Config.recompute="auto"`` (the marks pass calls it).

For one layer and a price ``lam`` (seconds a device byte is worth) the cheapest split of its
values into *kept* (saved for the backward) and *recomputed* is a minimum s-t cut, the
formulation of torch's own partitioner with sequence-aware costs::

    source -> v_in    recompute cost of v (seconds; infinite for collectives and random ops)
    v_in   -> v_out   lam * bytes(v): the cost of keeping v
    u_out  -> v_in    infinite, for every edge u -> v inside the layer
    v_out  -> sink    infinite when the backward needs v (or v leaves the layer)

A value whose ``v_in`` falls on the sink side is recomputed (the edge from the source is cut);
one whose ``v_in -> v_out`` edge is cut is kept. Recompute costs are
``max(flops / PEAK_FLOPS, bytes / HBM_BYTES_PER_S)``: attention is quadratic in the sequence
(``4 B N Sq Sk H``, half when causal), so it is the last thing recomputed; token-wise ops cost
their memory traffic. The budget (``Config.memory_budget_gb``, default the device's memory less
``MARGIN``) is met by the cheapest plan among a grid of prices, each with and without host
offload (offload costs the part of a layer's copy that its backward cannot hide:
``bytes / HOST_BYTES_PER_S`` against twice the layer's forward time). Host memory is a budget
too (``Config.host_memory_gb``, default the host's memory shared by ``Config.host_processes``, less
``MARGIN``; :func:`host_budget`): an offload moves the kept values of the first layers, as
many as their pinned blocks fit it (:func:`offloaded_layers`; ``pinned_pool``'s blocks, whole
pages), never the last ``Config.offload_keep_layers``; the later layers keep theirs on
the device. A kept value counts in the layer whose backward reads it first, as in the offload
pass, which applies the same rule to what the partitioner saved.

The predicted peak is an estimate: parameters, gradients and AdamW states (``STATIC_COPIES``
times the parameters), the kept values, and twice the largest layer's values (its recompute
and its gradients). The plan goes to the explain report with a memory timeline.

Before / after: the graph's values are unchanged; each node of a layer gets torch's
checkpoint marks (``meta["recompute"]``: MUST_SAVE for kept values, PREFER_RECOMPUTE for the
rest; ``meta["ac_graph_id"]``), which AOTAutograd's partitioner reads.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from autosp import collectives
from autosp._torch_private import size_hint
from autosp.graph_utils import tensor_bytes, val
from autosp.kernels.document_attention import DOCUMENT_ATTENTION
from autosp.kernels.pinned_pool import block_bytes
from autosp.passes._attention import SDPA_TARGETS, is_attention_call, sdpa_args
from autosp.passes.chunk_attention import CHUNKED_ATTENTION

PEAK_FLOPS = 792e12  # bf16 matmul ceiling measured on H200 (ranks costs; not a timing)
HBM_BYTES_PER_S = 4.8e12
HOST_BYTES_PER_S = 25e9  # pinned host copies, one direction, with compute running beside them
MIN_STRETCH_S = 1e-3  # compute shorter than this is not worth a second copy or a recomputation
MIN_FRACTION = 16  # offload a saved tensor of at least 1/16 the size of the largest one (smaller: not worth a copy)
MARGIN = 0.10  # of the device's (and the host's) memory left out of the default budgets
STATIC_COPIES = 4  # parameters, gradients and two AdamW states, in the parameters' dtype
PRICES = [10.0 ** (e / 4) for e in range(-80, -12)]  # lam grid, seconds per byte: 1e-20 .. 1e-3.25

# Ops whose backward needs none of their inputs' values (shape-only or linear in one input).
_NO_NEED = {operator.getitem, operator.add, operator.sub, operator.neg, torch.add, torch.sub, torch.neg, torch.cat,
            torch.split, torch.chunk, torch.narrow, torch.transpose, torch.reshape, torch.flatten, torch.unsqueeze,
            torch.squeeze, torch.permute, torch.sum, torch.mean, torch.repeat_interleave, torch.nn.functional.embedding,
            torch.nn.functional.pad, torch.nn.functional.dropout}
_NO_NEED_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "expand", "unsqueeze", "squeeze", "to",
                    "float", "type_as", "flatten", "chunk", "split", "narrow", "sum", "mean", "add", "sub", "neg",
                    "__add__", "__sub__", "__neg__", "clone", "repeat", "size"}
_RANDOM = {torch.rand, torch.randn, torch.rand_like, torch.randn_like, torch.bernoulli, torch.nn.functional.dropout}


@dataclass
class LayerPlan:
    kept: set[fx.Node]  # saved for the backward
    recomputed: set[fx.Node]  # run again in the backward
    kept_bytes: int
    recompute_s: float


@dataclass
class MemoryPlan:
    """The chosen plan and its estimate (all bytes are per device)."""

    budget: int
    price: float
    predicted_peak: int
    static: int
    kept: int  # on the device
    host: int  # pinned host memory the offloaded layers take (the allocator's blocks)
    working: int
    recompute_s: float
    exposed_copy_s: float
    fits: bool
    layers: dict[int, LayerPlan] = field(default_factory=dict)
    host_budget: int = 2**62
    offloaded: tuple[int, ...] = ()  # the layers whose kept values go to the host

    @property
    def offload(self) -> bool:
        return bool(self.offloaded)

    def summary(self) -> str:
        b = _human
        out = (f"memory plan: budget {b(self.budget)}, predicted peak {b(self.predicted_peak)} "
               f"(parameters+gradients+AdamW {b(self.static)}, kept {b(self.kept)}, working {b(self.working)}); "
               f"host {b(self.host)} of {b(self.host_budget)}"
               + (f" (layers {self.offloaded[0]}-{self.offloaded[-1]} offloaded)" if self.offloaded else "")
               + f"; recompute ~{self.recompute_s * 1e3:.3g} ms, exposed copies "
               f"~{self.exposed_copy_s * 1e3:.3g} ms a step; offload {'on' if self.offload else 'off'}")
        return out if self.fits else out + "; DOES NOT FIT the budget: the least-memory plan is used"


def _human(n: int) -> str:
    if n >= 2**60:
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return str(n)


def host_budget(host_memory_gb: float | None, host_processes: int | None = None) -> int:
    """The pinned host bytes one process's offload may take in a compiled region:
    ``Config.host_memory_gb``, or the host's memory (``MemTotal``, or the container's limit where
    lower) shared by ``host_processes`` (``Config.host_processes``; None: the GPUs this process
    sees, one process a GPU as torchrun starts them), less ``MARGIN``; unlimited where the host
    does not say. The default reads what is installed, not what is free: the same on every rank
    of a host, so that every rank offloads the same layers (what is offloaded decides what the
    backward rematerializes; ranks that differ fail ``check_plan``). Where other work holds host
    memory, set ``host_memory_gb``."""
    if host_memory_gb is not None:
        return int(host_memory_gb * 2**30)
    total = _host_memory_bytes()
    if total is None:
        return 2**62
    sharing = host_processes or max(1, torch.cuda.device_count())
    return int(total / sharing * (1 - MARGIN))


def _host_memory_bytes() -> int | None:
    """The host's memory (``/proc/meminfo``'s MemTotal), or the cgroup's limit where lower."""
    total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                limit = int(f.read().strip())  # "max" (no limit) raises ValueError
        except (OSError, ValueError):
            continue
        total = limit if total is None else min(total, limit)
        break
    return total


def offloaded_layers(layer_bytes: dict[int, int], budget: int) -> list[int]:
    """The layers (of ``layer_bytes``: layer -> pinned bytes of what it would offload) whose
    saved values go to the host: from the first layer on, while they fit ``budget``. The later
    layers keep theirs on the device, as the last ``Config.offload_keep_layers`` do: their
    backward runs first, with the least compute before it to hide a copy."""
    chosen, used = [], 0
    for layer in sorted(layer_bytes):
        if used + layer_bytes[layer] > budget:
            break
        chosen.append(layer)
        used += layer_bytes[layer]
    return chosen


def plan_layers(layers: dict[fx.Node, int], parameters_bytes: int, budget: int, allow_offload: bool,
                host_budget: int = 2**62, keep_layers: int = 1) -> MemoryPlan:
    """Choose the kept values of every layer (``layers``: node -> layer index) under ``budget``
    (device bytes); an offload takes at most ``host_budget`` pinned bytes and leaves the last
    ``keep_layers`` layers' values on the device."""
    if keep_layers < 1:
        raise ValueError(f"keep_layers must be >= 1 (the last layer's backward comes first), got {keep_layers}")
    by_layer: dict[int, list[fx.Node]] = {}
    for node, layer in layers.items():
        by_layer.setdefault(layer, []).append(node)
    resident = set(sorted(by_layer)[-keep_layers:])  # the last layers' backward comes first
    static = STATIC_COPIES * parameters_bytes
    working = 2 * max(sum(_bytes(n) for n in nodes) for nodes in by_layer.values())
    # A layer's compute time, against which its copies to the host hide (collectives, whose
    # recompute cost is infinite, are left out: they do not hide a copy on the compute stream).
    forward_s = {i: sum(c for n in nodes if (c := _cost(n)) != math.inf) for i, nodes in by_layer.items()}
    shapes = {i: _LayerShape.of(nodes, layers) for i, nodes in by_layer.items()}  # once, not per price
    cache: dict[tuple, tuple[list[int], list[int], float]] = {}
    best, least = None, None
    for price in PRICES:
        per_layer = {i: _solve(shape, price, cache) for i, shape in shapes.items()}
        kept_total = sum(p.kept_bytes for p in per_layer.values())
        recompute = sum(p.recompute_s for p in per_layer.values())
        device_bytes, host_bytes = _offloadable(per_layer, layers, resident)
        choices = [()] + ([tuple(offloaded_layers(host_bytes, host_budget))] if allow_offload else [])
        for offloaded in dict.fromkeys(choices):  # an offload the host has no room for is no offload
            moved = sum(device_bytes[i] for i in offloaded)
            exposed = sum(max(0.0, device_bytes[i] / HOST_BYTES_PER_S - 2 * forward_s.get(i, 0.0)) for i in offloaded)
            peak = static + kept_total - moved + working
            plan = MemoryPlan(budget, price, peak, static, kept_total - moved,
                              sum(host_bytes[i] for i in offloaded), working, recompute, exposed, peak <= budget,
                              per_layer, host_budget, offloaded)
            if least is None or peak < least.predicted_peak:
                least = plan
            if plan.fits and (best is None or recompute + exposed < best.recompute_s + best.exposed_copy_s):
                best = plan
    return best or least


def first_reader(node: fx.Node, layers: dict[fx.Node, int]) -> int:
    """The layer whose backward needs a saved value first: the last layer that reads it (the
    backward runs the layers in reverse; a layer's output is the next layer's), else its own;
    -1 for a value of no layer read by none (the embedding's output belongs to layer 0)."""
    return max({layers[u] for u in node.users if u in layers} | {layers.get(node, -1)})


def _offloadable(per_layer: dict[int, LayerPlan], layers: dict[fx.Node, int], resident: set[int]
                 ) -> tuple[dict[int, int], dict[int, int]]:
    """What an offload would move, by layer, as the offload pass picks it: a kept value belongs to
    the layer whose backward needs it first (the last layer that reads it: a layer's output is
    the next layer's), the ``resident`` layers' stay, and so do values under 1/``MIN_FRACTION``
    of the largest. Returns the device bytes and the pinned host bytes of each layer."""
    kept = [n for p in per_layer.values() for n in p.kept]
    largest = max((_bytes(n) for n in kept), default=0)
    device: dict[int, int] = {}
    host: dict[int, int] = {}
    for n in kept:
        layer = first_reader(n, layers)
        size = _bytes(n)
        if layer in resident or size == 0 or size * MIN_FRACTION < largest:
            continue
        device[layer] = device.get(layer, 0) + size
        host[layer] = host.get(layer, 0) + block_bytes(size)
    return device, host


@dataclass(frozen=True)
class _LayerShape:
    """One layer's values, its outputs, and a key equal for layers of the same structure (the
    cuts of such layers are the same: solved once per price)."""

    nodes: list[fx.Node]
    leaving: frozenset[fx.Node]
    needed: frozenset[fx.Node]  # what the backward reads (and the outputs)
    key: tuple

    @staticmethod
    def of(nodes: list[fx.Node], layers: dict[fx.Node, int]) -> _LayerShape:
        index = {n: i for i, n in enumerate(nodes)}
        # The layer's outputs: kept, or the backward would rerun the whole layer early.
        leaving = frozenset(n for n in nodes if any(layers.get(u) != layers[n] for u in n.users if u.op != "output"))
        needed = set(leaving).union(*({a for a in _needed_by_backward(n) if a in index} for n in nodes))
        key = tuple((str(n.target), _bytes(n), tuple(index.get(a, -1) for a in n.all_input_nodes), n in leaving)
                    for n in nodes)
        return _LayerShape(nodes, leaving, frozenset(needed), key)


def _solve(layer: _LayerShape, price: float, cache) -> LayerPlan:
    """The minimum cut of one layer at one price (memoized on the layer's shape)."""
    import networkx as nx

    nodes, leaving, needed = layer.nodes, layer.leaving, layer.needed
    key = (price, layer.key)
    if key in cache:
        kept_idx, recomputed_idx, recompute_s = cache[key]
        kept = {nodes[i] for i in kept_idx}
        return LayerPlan(kept, {nodes[i] for i in recomputed_idx}, sum(_bytes(n) for n in kept), recompute_s)
    inside = set(nodes)
    g = nx.DiGraph()
    g.add_node("source")
    g.add_node("sink")
    for n in nodes:
        cost = math.inf if n in leaving else _cost(n)
        if cost != math.inf:
            g.add_edge("source", (n, "in"), capacity=cost)
        else:
            g.add_edge("source", (n, "in"))  # no capacity attribute: infinite
        g.add_edge((n, "in"), (n, "out"), capacity=price * _bytes(n))
        for a in n.all_input_nodes:
            if a in inside:
                g.add_edge((a, "out"), (n, "in"))
        if n in needed:
            g.add_edge((n, "out"), "sink")
    _, (source_side, _) = nx.minimum_cut(g, "source", "sink")
    kept = {n for n in nodes if (n, "in") in source_side and (n, "out") not in source_side}
    recomputed = {n for n in nodes if (n, "in") not in source_side}
    recompute_s = sum(_cost(n) for n in recomputed)
    index = {n: i for i, n in enumerate(nodes)}
    cache[key] = ([index[n] for n in kept], [index[n] for n in recomputed], recompute_s)
    return LayerPlan(kept, recomputed, sum(_bytes(n) for n in kept), recompute_s)


def _bytes(node: fx.Node) -> int:
    """A value's bytes; a view counts as its own size (keeping it keeps its base: an estimate on
    the safe side)."""
    v = val(node)
    return tensor_bytes(v) if isinstance(v, torch.Tensor) else 0


def _cost(node: fx.Node) -> float:
    """Seconds to recompute ``node`` (an estimate); infinite for what must never be recomputed."""
    if collectives.is_collective(node.target) or node.target in _RANDOM:
        return math.inf
    v = val(node)
    if not isinstance(v, torch.Tensor) and node.target not in (CHUNKED_ATTENTION, DOCUMENT_ATTENTION):
        return 0.0
    flops = v.numel() if isinstance(v, torch.Tensor) else 0
    if is_attention_call(node):
        q, k = (val(node.args[0]), val(node.args[1]))
        if node.target in SDPA_TARGETS:
            causal = sdpa_args(node)["is_causal"]
        else:  # chunked: its causal flag; documents: at most causal attention's work
            causal = node.target is DOCUMENT_ATTENTION or bool(node.args[3])
        keys = size_hint(k.shape[-2])
        window = node.args[5] if node.target is DOCUMENT_ATTENTION and len(node.args) > 5 else None
        if window is not None and window < keys:  # a sliding window: at most window keys a query
            flops = 4 * q.numel() * window
        else:
            flops = 4 * q.numel() * keys * (0.5 if causal else 1.0)
    elif node.target in (torch.nn.functional.linear, torch._C._nn.linear, torch.matmul, torch.mm, torch.bmm,
                         operator.matmul, "matmul", "mm", "bmm"):
        k_dim = val(node.args[0]).shape[-1]
        flops = 2 * v.numel() * k_dim
    traffic = _bytes(node) + sum(_bytes(a) for a in node.all_input_nodes)
    return max(flops / PEAK_FLOPS, traffic / HBM_BYTES_PER_S)


def _needed_by_backward(node: fx.Node) -> list[fx.Node]:
    """The values ``node``'s backward reads (its floating inputs, and for attention its output)."""
    if node.op == "call_method" and node.target in _NO_NEED_METHODS:
        return []
    if node.op == "call_function" and node.target in _NO_NEED:
        return []
    if collectives.is_collective(node.target):
        return []
    inputs = [a for a in node.all_input_nodes
              if isinstance(val(a), torch.Tensor) and val(a).is_floating_point()]
    if node.target in SDPA_TARGETS:
        return inputs + [node]
    if node.target in (CHUNKED_ATTENTION, DOCUMENT_ATTENTION):  # its output: the getitem of the tuple it returns
        return inputs + [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
    return inputs

