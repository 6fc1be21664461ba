"""Every option of autosp, in one frozen dataclass validated on construction.

Options reach the backend as ``torch.compile(model, backend="autosp", options={...})`` or
``autosp.backend(**options)``; both go through :meth:`Config.from_options`, which turns an
unknown or contradictory option into a ``ValueError`` that names it. Nothing in autosp reads
environment variables: what is not here is not configurable.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

COMPILERS = ("inductor", "aot_eager", "eager")
OUTPUT_LAYOUTS = ("dtensor", "full", "local")
ATTENTION_KERNELS = ("auto", "cudnn", "flash", "efficient", "math")
LOGITS = ("keep", "detach", "drop")
RECOMPUTE = ("none", "selective", "full", "blocks", "attention_out", "auto")
EXCHANGES = ("collective", "peer_copy")
EXCHANGE_TIMEOUT_S = 600.0  # NCCL's default timeout in torch is 10 minutes too


@dataclass(frozen=True)
class Config:
    """Options of the autosp backend.

    Attributes:
        group: the sequence-parallel process group, or its name. Default: the default process
            group when ``torch.distributed`` is initialized, else no parallelism (size 1).
        mesh: a ``DeviceMesh``; with ``sp_dim`` it names the sequence-parallel dimension.
        sp_dim: the mesh dimension (name or index) to shard the sequence over.
        attention: SDPA kernel: ``"auto"`` lets torch pick the fastest for the device and shape
            (cuDNN on Hopper with torch 2.11), or one of ``"cudnn"``, ``"flash"``,
            ``"efficient"``, ``"math"`` to force it.
        compiler: the inner compiler the rewritten graph is handed to.
        outputs: layout of returned tensors that carry the sequence dimension: ``"dtensor"``
            (semantically full, physically sharded), ``"full"`` (all-gathered), ``"local"``
            (this rank's shard, padding removed).
        dump_dir: when set, the explain report of every compiled region is written there.
        disable_passes: names of passes to skip (see ``autosp.pipeline.PASSES``).
        check_plan: before the first collective of a compiled region, check that every rank
            built the same plan (one small all-gather per region, once).
        fused_loss: compute ``cross_entropy(linear(h, W))`` in row chunks with its gradients,
            so that the ``[N, vocab]`` logits are never built for the loss (exact; any group size).
        loss_chunk: rows per chunk of the fused loss; ``None``: about 1 GiB of float32 logits.
        logits: what a returned logits output becomes once the loss is fused: ``"keep"``
            (computed as before), ``"detach"`` (returned without gradient), ``"drop"`` (an
            empty tensor; the logits are never computed).
        recompute: what repeated layers recompute in the backward: ``"none"`` (torch's default
            partitioning), ``"selective"`` (everything but attention and collectives), ``"full"``
            (everything, attention and collectives included: a layer keeps its input alone),
            ``"blocks"`` (as ``"full"``, and a layer also keeps its attention block's output, so
            that its backward recomputes the MLP block and the attention block one after the
            other, never both at once), ``"attention_out"`` (as ``"full"``, and a layer also keeps
            attention's output and log-sum-exp: the backward recomputes the rest, attention's
            inputs included, but never attention; as ``"blocks"`` in memory, attention's forward
            FLOPs less), or ``"auto"`` (the planner chooses what each layer keeps, recomputes or offloads under
            ``memory_budget_gb``). See autosp/passes/activation_policy.py and memory_plan.py.
        tile_mlp: run each layer's MLP over this many sequence tiles (1: off), so its wide
            intermediates exist one tile at a time. See autosp/passes/tile_mlp.py.
        offload_keep_layers: with ``offload``, how many of the last layers keep what they save on
            the device (at least 1: the last layer's backward comes first). More trades device
            memory for host memory, when host memory is what bounds the length.
        offload: what the layers keep for the backward (but the last layer) waits in pinned host
            memory, copied on a side stream and prefetched in the backward as late as the
            compute before its use hides the copy (at most a layer ahead). Needs ``recompute`` (its layer marks) and a compiler that partitions (inductor, aot_eager).
            See autosp/passes/offload.py. With ``attention_chunks`` and ``recompute="selective"``
            the chunked attention's saved q, k, v, o chunks stream through pinned host memory,
            a chunk group at a time in the backward (FPDT).
        memory_budget_gb: the device memory (GiB) ``recompute="auto"`` plans for; ``None``: the
            device's memory less 10%.
        host_memory_gb: the pinned host memory (GiB) one process's offload may take a step, in
            one compiled region; ``None``: the host's memory (or the container's limit) shared
            by ``host_processes``, less 10%, the same on every rank. The first layers' saved tensors go to the host as far as it holds them
            (counted in whole pages); the later layers keep theirs on the device, and
            the report says so. With ``offload`` or ``recompute="auto"`` (which plans with it).
            Chunked attention's streamed chunks are not counted.
        host_processes: the processes that share this host's memory, for ``host_memory_gb``'s
            default; ``None``: the GPUs this process sees (torchrun starts one process a GPU), 1
            without CUDA. Set it where each process sees only its own GPU.
        buffer_reuse: Inductor's buffer reuse (a dead buffer's storage held for a later buffer of
            the same size). ``False`` frees each buffer at its last use: a lower peak where the
            reuse spans a long stretch (a layer's recomputed MLP tiles held through its attention
            backward), a few more allocator calls. With ``compiler="inductor"``. A forward that
            copies to the host (``offload``) is compiled without it whatever this says.
        overlap_grad_reduce: the compiled backward averages each parameter's gradient over the
            group as soon as it has made it, so the all-reduces overlap the rest of the backward
            (on a second communicator over the same ranks, made at the first compile); the
            gradients leave the region as the group mean and ``reduce_gradients`` is not
            needed. An embedding's table gradient (fewer tokens than rows) is made on every rank
            from the gathered token gradients instead of all-reduced after the last layer.
            See autosp/passes/grad_reduce.py.
        attention_chunks: run each self-attention over this many sequence chunks (1: off), FPDT's
            chunked attention: pairs of query and key chunks merged by log-sum-exp, pairs above the
            causal diagonal skipped. See autosp/passes/chunk_attention.py.
        attention_head_groups: run each self-attention as this many calls over groups of heads
            (1: off; it must divide the key/value heads one device sees): the attention
            kernel's backward holds float32 accumulators for the heads of one call, a group's
            at a time instead of all of them. ``"auto"``: per call, the fewest groups whose
            accumulators fit in 1 GiB (by estimate). Exact. See autosp/passes/head_groups.py.
        split_projections: make each attention's q, k and v projections one head chunk at a time,
            the other ranks' chunks first, so that their all-to-all crosses while this rank's own
            chunk is made. Exact. Off by default: with NCCL carrying the chunks it measured
            slower (NCCL's kernel waits for the GEMM behind it to free SMs). See
            autosp/passes/split_projections.py.
        exchange: what carries the sequence-parallel all-to-alls. ``"collective"``: the group's
            backend (NCCL, gloo). ``"peer_copy"``: the copy engines (CUDA, every rank on one
            host): each rank writes its rows straight into the peers' receive buffers in
            symmetric memory, with flags written and waited for by the streams; no kernel, no
            SM, so the transfer runs beside the GEMMs placed between an all-to-all and its wait.
            The receive buffers (two slots of the largest row block per rank) are outside the
            caching allocator. Run it with ``CUDA_MODULE_LOADING=EAGER`` (under lazy loading a
            kernel's first launch waits for the exchanges in flight; the exchanger warns). See
            autosp/kernels/peer_exchange.py and autosp/passes/peer_exchange.py.
        exchange_timeout_s: with ``exchange="peer_copy"``, how long an exchange may wait on the
            device for its peers (from when the device reaches it) before the process writes what
            it waits for and exits 1 (a stream wait has no timeout of its own; NCCL's watchdog
            does the same for a collective). Allow for a peer that compiles its first step
            later than this rank.
    """

    group: Any = None
    mesh: Any = None
    sp_dim: str | int | None = None
    attention: str = "auto"
    compiler: str = "inductor"
    outputs: str = "dtensor"
    dump_dir: str | None = None
    disable_passes: tuple[str, ...] = field(default_factory=tuple)
    check_plan: bool = True
    fused_loss: bool = True
    loss_chunk: int | None = None
    logits: str = "keep"
    recompute: str = "none"
    tile_mlp: int = 1
    offload: bool = False
    offload_keep_layers: int = 1
    attention_chunks: int = 1
    attention_head_groups: int | str = 1
    memory_budget_gb: float | None = None
    host_memory_gb: float | None = None
    host_processes: int | None = None
    overlap_grad_reduce: bool = False
    buffer_reuse: bool = True
    split_projections: bool = False
    exchange: str = "collective"
    exchange_timeout_s: float = EXCHANGE_TIMEOUT_S

    def __post_init__(self) -> None:
        from autosp.pipeline import PASS_NAMES, POST_PARTITION_PASSES

        _one_of("compiler", self.compiler, COMPILERS)
        _one_of("outputs", self.outputs, OUTPUT_LAYOUTS)
        _one_of("attention", self.attention, ATTENTION_KERNELS)
        if self.group is not None and self.mesh is not None:
            raise ValueError("options 'group' and 'mesh' contradict each other: give one of them")
        if self.sp_dim is not None and self.mesh is None:
            raise ValueError("option 'sp_dim' needs option 'mesh'")
        if self.mesh is not None and self.sp_dim is None and self.mesh.ndim != 1:
            raise ValueError(f"option 'mesh' has {self.mesh.ndim} dimensions: name one with 'sp_dim'")
        if isinstance(self.disable_passes, str) or not isinstance(self.disable_passes, (tuple, list)):
            raise ValueError("option 'disable_passes' must be a list of pass names")
        object.__setattr__(self, "disable_passes", tuple(self.disable_passes))
        known = PASS_NAMES + POST_PARTITION_PASSES
        unknown = sorted(set(self.disable_passes) - set(known))
        if unknown:
            raise ValueError(f"option 'disable_passes' names unknown passes {unknown}; known: {list(known)}")
        if not isinstance(self.check_plan, bool):
            raise ValueError("option 'check_plan' must be True or False")
        if not isinstance(self.fused_loss, bool):
            raise ValueError("option 'fused_loss' must be True or False")
        if self.loss_chunk is not None and (not isinstance(self.loss_chunk, int) or self.loss_chunk <= 0):
            raise ValueError(f"option 'loss_chunk' must be a positive number of rows, got {self.loss_chunk!r}")
        _one_of("logits", self.logits, LOGITS)
        _one_of("recompute", self.recompute, RECOMPUTE)
        if isinstance(self.tile_mlp, bool) or not isinstance(self.tile_mlp, int) or self.tile_mlp < 1:
            raise ValueError(f"option 'tile_mlp' must be a number of tiles >= 1 (1: off), got {self.tile_mlp!r}")
        if isinstance(self.attention_chunks, bool) or not isinstance(self.attention_chunks, int) \
                or self.attention_chunks < 1:
            raise ValueError("option 'attention_chunks' must be a number of chunks >= 1 (1: off), "
                             f"got {self.attention_chunks!r}")
        if self.attention_head_groups != "auto" and (isinstance(self.attention_head_groups, bool) or not isinstance(
                self.attention_head_groups, int) or self.attention_head_groups < 1):
            raise ValueError("option 'attention_head_groups' must be a number of head groups >= 1 (1: off) or "
                             f"'auto', got {self.attention_head_groups!r}")
        if self.memory_budget_gb is not None and (isinstance(self.memory_budget_gb, bool) or not isinstance(
                self.memory_budget_gb, (int, float)) or self.memory_budget_gb <= 0):
            raise ValueError(f"option 'memory_budget_gb' must be a positive number of GiB, got {self.memory_budget_gb!r}")
        if self.memory_budget_gb is not None and self.recompute != "auto":
            raise ValueError("option 'memory_budget_gb' is the budget of recompute='auto': set recompute='auto'")
        if self.host_memory_gb is not None and (isinstance(self.host_memory_gb, bool) or not isinstance(
                self.host_memory_gb, (int, float)) or not 0 <= self.host_memory_gb < math.inf):
            raise ValueError(f"option 'host_memory_gb' must be a number of GiB >= 0, got {self.host_memory_gb!r}")
        if self.host_memory_gb is not None and not (self.offload or self.recompute == "auto"):
            raise ValueError("option 'host_memory_gb' bounds offload: set offload=True (or recompute='auto')")
        if self.host_processes is not None and (isinstance(self.host_processes, bool)
                                                or not isinstance(self.host_processes, int) or self.host_processes < 1):
            raise ValueError(f"option 'host_processes' must be an integer >= 1, got {self.host_processes!r}")
        if not isinstance(self.split_projections, bool):
            raise ValueError(f"option 'split_projections' must be True or False, got {self.split_projections!r}")
        _one_of("exchange", self.exchange, EXCHANGES)
        if self.exchange == "peer_copy" and self.compiler == "eager":
            raise ValueError("option exchange='peer_copy' rewrites the partitioned graphs: it needs compiler "
                             "'inductor' or 'aot_eager', not 'eager'")
        if isinstance(self.exchange_timeout_s, bool) or not isinstance(self.exchange_timeout_s, (int, float)) \
                or not 0 < self.exchange_timeout_s < math.inf:
            raise ValueError(f"option 'exchange_timeout_s' must be a positive number of seconds, "
                             f"got {self.exchange_timeout_s!r}")
        if not isinstance(self.buffer_reuse, bool):
            raise ValueError("option 'buffer_reuse' must be True or False")
        if not self.buffer_reuse and self.compiler != "inductor":
            raise ValueError(f"option 'buffer_reuse'=False is Inductor's; compiler is {self.compiler!r}")
        if not isinstance(self.overlap_grad_reduce, bool):
            raise ValueError("option 'overlap_grad_reduce' must be True or False")
        if not isinstance(self.offload, bool):
            raise ValueError("option 'offload' must be True or False")
        if isinstance(self.offload_keep_layers, bool) or not isinstance(self.offload_keep_layers, int) \
                or self.offload_keep_layers < 1:
            raise ValueError("option 'offload_keep_layers' must be a number of layers >= 1, "
                             f"got {self.offload_keep_layers!r}")
        if self.offload_keep_layers != 1 and not (self.offload or self.recompute == "auto"):
            raise ValueError("option 'offload_keep_layers' is about offload: set offload=True (or recompute='auto')")
        if self.offload and self.recompute == "none":
            raise ValueError("option 'offload' needs option 'recompute' (any but 'none'): "
                             "it offloads what the layers it marks keep")
        if self.offload and self.compiler == "eager":
            raise ValueError("option 'offload' needs a compiler that partitions forward and backward "
                             "('inductor' or 'aot_eager'), not 'eager'")
        if self.logits != "keep" and not self.fused_loss:
            raise ValueError(f"option 'logits'={self.logits!r} needs option 'fused_loss'=True")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None = None, **more: Any) -> Config:
        """Build a Config from a dict and keyword options; unknown names raise ``ValueError``."""
        merged = {**(options or {}), **more}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown autosp option(s) {unknown}; known options: {sorted(known)}")
        return cls(**merged)

    def summary(self) -> dict[str, Any]:
        """The options as plain values (groups and meshes by name), for reports and plan hashes."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("group", "mesh") and v is not None:
                v = getattr(v, "group_name", None) or repr(v)
            out[f.name] = v
        return out


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"option {name!r} is {value!r}; expected one of {list(allowed)}")
