"""ShardedOptimizer: the optimizer step split over the sequence-parallel ranks (ZeRO stage 1).

Sequence parallelism replicates the parameters, so after the gradient mean every rank would run
the same optimizer step on the same numbers: at 16K tokens on 2 GPUs that repeated AdamW step
(1.2B parameters) costs more than every collective the step leaves exposed. Here each rank
updates a disjoint 1/P of the elements and the ranks exchange the updated values::

    opt = autosp.ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-5, fused=True)
    loss.backward()                  # gradients the group mean (overlap_grad_reduce, or reduce_gradients)
    opt.step()                       # this rank's 1/P of the elements, then an all-gather of them
    opt.zero_grad(set_to_none=True)

The parameters move into flat blocks (whole parameters in model order, about 1/``rounds`` of
them a block, each block its own storage; each ``p.data`` becomes a view of its block: the model
reads them as before). Each block is cut into P equal chunks and rank r owns chunk r, as views of
the parameters that fall in it (a chunk may cut a parameter anywhere: the update of an
elementwise optimizer does not care)::

    block 0 = [ chunk r0 | chunk r1 ]   block 1 = [ chunk r0 | chunk r1 ]   ...
    step:   update own chunk of block 0; all_gather(block 0)   <- runs while block 1 is updated
            update own chunk of block 1; all_gather(block 1)
            ...

Each block's all-gather is in place (the rank's chunk is already where the gather puts it) and
starts as soon as the block is updated, beside the next block's update; it runs on the gradient
all-reduces' communicator (``backend.gradient_group_name``). The step ends with the current
stream waiting for the last gather (the host does not wait). Measured at 16K tokens on 2x H200
(benchmarks/RESULTS.md, 2026-11-30): the step's AdamW kernels 8.6 -> 5.1 ms, the peak 2.8 GiB
lower. (Leaving the gathers in flight for the next forward to wait for, each layer for its own
block, was built and measured: 0.201 against 0.202 s a step, no gain, and the forward's
all-to-alls ran slower beside the gathers; it is not kept.)

Where a block's gather takes longer than its update (there: 0.88 against 0.71 ms a block, the
gathers sharing the memory with the updates), the step waits for the gathers, and the last
blocks are better updated whole by every rank: their update needs no gather and runs while the
others' cross (``replicate``)::

    update own chunk of block 0; gather(block 0)
    ...
    update own chunk of block B-k-1; gather(block B-k-1)
    update all of block B-k .. B-1          <- beside the gathers still in flight

There, ``rounds=16, replicate=2``: the optimizer's part of the step 7.4 -> 6.3 ms (now set by
the updates), the peak 0.8 GiB higher than with none replicated.

How the updated chunks reach the other ranks (``gather``):

- ``"all_gather"`` (the default; any backend): the in-place all-gather above, on the gradient
  communicator. NCCL's kernel takes SMs and memory bandwidth from the updates beside it.
- ``"peer_copy"`` (CUDA, the ranks' GPUs on one host): the blocks live in symmetric memory
  (``_torch_private.PeerBuffers``: every rank's block is mapped into every other's address
  space), and as soon as a rank has updated its chunk of a block it writes the chunk straight
  into the same place of every peer's block, a device-to-device copy on a side stream that the
  copy engines carry over NVLink (no kernel, no SMs), beside the next block's update. Two
  barriers bound it: one before the first write (every rank's backward, which reads its own
  copy of the weights, is over), one after the last (every write has landed before any rank's
  next forward reads its block)::

      barrier 0 (compute stream)
      update own chunk of block 0 | copy it into each peer's block 0 (side stream)
      update own chunk of block 1 | copy it into each peer's block 1
      ...
      barrier 1 (side stream); the compute stream waits for the side stream

Optimizer states exist for the owned elements only (AdamW: 2 x params / P fewer elements on
every rank), and for the whole of a replicated block. Every element of a sharded block has one
owner, and every rank updates a replicated block's elements the same way from the same numbers,
so the replicas stay bit-identical.

Only optimizers whose update is elementwise are accepted (SGD, Adam, AdamW, ...): an update
that reads a whole tensor (a norm, a factored second moment) would see pieces. The gradients
must be the group's mean on every rank when ``step`` runs (autosp's ``overlap_grad_reduce``,
``autosp.reduce_gradients``, DDP or FSDP's): each rank reads only its own elements of them.
``state_dict`` holds this rank's share (and says whose): each rank saves and loads its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from autosp._torch_private import PeerBuffers, resolve_group
from autosp.backend import gradient_group_name

# torch 2.13 renamed all_gather_into_tensor (the old name warns); torch 2.11 has only the old one
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

GATHERS = ("all_gather", "peer_copy")
ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.Adamax,
               torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop)


class _Block:
    """One flat block of whole parameters: this rank's pieces of it, and their optimizer."""

    def __init__(self, flat: torch.Tensor, chunk: int, pieces: list[tuple[int, torch.nn.Parameter, torch.Tensor, int]],
                 inner: torch.optim.Optimizer | None, groups: list[int], replicated: bool = False,
                 peers: PeerBuffers | None = None, remote: list[torch.Tensor] | None = None):
        self.flat, self.chunk, self.replicated = flat, chunk, replicated  # replicated: every rank updates it whole
        self.peers = peers  # gather="peer_copy": the symmetric buffer flat is
        self.remote = remote or []  # ... and where this rank's chunk goes in each peer's block
        self.pieces = pieces  # (group index, parameter, piece: a view of the flat buffer, offset in the parameter)
        self.inner = inner  # None when this rank owns nothing in the block (padding)
        self.groups = groups  # the outer group index of each of inner's param groups


class ShardedOptimizer(torch.optim.Optimizer):
    """``optimizer_class`` over this rank's 1/P of every parameter's elements; ``step`` updates them
    and all-gathers the block it updated while it updates the next (module docstring).

    ``params``: as for any optimizer (tensors, or dicts of groups with their own options);
    ``group``: the ranks that hold the same parameters (the sequence-parallel group; default the
    world); ``rounds``: about how many blocks a dtype's parameters make (a parameter larger than
    a block is one alone); ``replicate``: how many of the last blocks (model order, over all
    dtypes) every rank updates whole, with no gather; ``gather``: ``"all_gather"`` or
    ``"peer_copy"`` (module docstring); ``defaults``: ``optimizer_class``'s options.
    Build it before the first step: it moves the parameters into flat blocks.
    """

    def __init__(self, params: Iterable, optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW, *,
                 group: dist.ProcessGroup | None = None, rounds: int = 8, replicate: int = 0,
                 gather: str = "all_gather", **defaults: Any):
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, ELEMENTWISE)):
            raise ValueError(f"ShardedOptimizer: {optimizer_class!r} is not one of the elementwise optimizers "
                             f"({', '.join(c.__name__ for c in ELEMENTWISE)}): its update may read a whole "
                             "tensor, and each rank holds pieces")
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
            raise ValueError(f"ShardedOptimizer: rounds must be a positive int, got {rounds!r}")
        if not isinstance(replicate, int) or isinstance(replicate, bool) or replicate < 0:
            raise ValueError(f"ShardedOptimizer: replicate must be an int >= 0, got {replicate!r}")
        if gather not in GATHERS:
            raise ValueError(f"ShardedOptimizer: gather must be one of {GATHERS}, got {gather!r}")
        if group is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("ShardedOptimizer needs an initialized process group (torch.distributed)")
            group = dist.group.WORLD
        super().__init__(params, defaults)
        self.optimizer_class, self.group, self.rounds, self.replicate = optimizer_class, group, rounds, replicate
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.gather = gather if self.world > 1 else "all_gather"  # one rank: nothing to send
        devices = {p.device.type for g in self.param_groups for p in g["params"]}
        if self.gather == "peer_copy" and devices != {"cuda"}:
            raise ValueError(f"ShardedOptimizer: gather='peer_copy' writes into the other GPUs' memory; "
                             f"the parameters are on {sorted(devices)}")
        name = gradient_group_name(group) if self.world > 1 else None
        self._comm = group if name is None else resolve_group(name)
        self._blocks = self._shard()
        self._side = torch.cuda.Stream(device=self._blocks[0].flat.device) if self.gather == "peer_copy" else None
        self._barrier = next((b.peers for b in self._blocks if b.peers is not None), None)
        for i, g in enumerate(self.param_groups):  # every option the inner optimizer filled in, shown here
            for b in self._blocks:
                if b.inner is not None and i in b.groups:
                    for k, v in b.inner.param_groups[b.groups.index(i)].items():
                        g.setdefault(k, v)
                    break

    def _shard(self) -> list[_Block]:
        """Move the parameters into flat blocks (whole parameters, in order, about 1/rounds of
        their dtype's elements a block, each block its own storage); make this rank's pieces of
        each block and their optimizer."""
        by_dtype: dict[torch.dtype, list[tuple[int, torch.nn.Parameter]]] = {}
        devices = set()
        for i, g in enumerate(self.param_groups):
            for p in g["params"]:
                by_dtype.setdefault(p.dtype, []).append((i, p))
                devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(f"ShardedOptimizer: parameters on several devices ({sorted(map(str, devices))})")
        cuts = []
        for entries in by_dtype.values():
            target = math.ceil(sum(p.numel() for _, p in entries) / self.rounds)
            block: list[tuple[int, torch.nn.Parameter]] = []
            size = 0
            for k, (i, p) in enumerate(entries):
                block.append((i, p))
                size += p.numel()
                if size >= target or k == len(entries) - 1:
                    cuts.append(block)
                    block, size = [], 0
        whole = len(cuts) - min(self.replicate, len(cuts))  # the first block every rank updates whole
        return [self._block(entries, replicated=b >= whole) for b, entries in enumerate(cuts)]

    def _block(self, entries: list[tuple[int, torch.nn.Parameter]], replicated: bool = False) -> _Block:
        """One flat block holding ``entries``' parameters (each ``p.data`` a view of it), padded to
        P equal chunks; this rank's chunk as views and the optimizer over them (a replicated
        block: the whole block is this rank's, one chunk of the block's size, and no gather)."""
        world, rank = (1, 0) if replicated else (self.world, self.rank)
        chunk = math.ceil(sum(p.numel() for _, p in entries) / world)
        first = entries[0][1]
        peers, remote = None, None
        if self.gather == "peer_copy" and not replicated:
            peers = PeerBuffers(chunk * world, first.dtype, first.device, self.group)
            flat = peers.local.zero_()
            remote = [peers.remote(q, rank * chunk, chunk) for q in range(world) if q != rank]
        else:
            flat = torch.zeros(chunk * world, dtype=first.dtype, device=first.device)
        spans, offset = [], 0
        with torch.no_grad():
            for i, p in entries:
                n = p.numel()
                flat[offset:offset + n].copy_(p.reshape(-1))
                p.data = flat[offset:offset + n].view(p.shape)
                spans.append((i, p, offset, n))
                offset += n
        lo, hi = rank * chunk, (rank + 1) * chunk
        pieces = [(i, p, flat[max(o, lo):min(o + n, hi)], max(o, lo) - o) for i, p, o, n in spans if o < hi and o + n > lo]
        order = sorted({i for i, *_ in pieces})
        if not order:
            return _Block(flat, chunk, pieces, None, [], replicated, peers, remote)
        groups = [{**_options(self.param_groups[i]), "params": [piece for j, _, piece, _ in pieces if j == i]}
                  for i in order]
        return _Block(flat, chunk, pieces, self.optimizer_class(groups, **self.defaults), order, replicated, peers,
                      remote)

    @torch.no_grad()
    def step(self, closure=None):
        """Update this rank's elements, block by block, each block's all-gather (or its copies
        into the peers' blocks) started as soon as it is updated; the current stream waits for
        the last of them before it returns."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        works = []
        if self._barrier is not None:
            compute = torch.cuda.current_stream()
            self._barrier.barrier(0)  # every rank's backward has read its weights: blocks may be written
        for b in self._blocks:
            if b.inner is not None:
                for j, i in enumerate(b.groups):  # options a scheduler changed since the last step
                    b.inner.param_groups[j].update(_options(self.param_groups[i]))
                for _, p, piece, at in b.pieces:
                    piece.grad = None if p.grad is None else p.grad.reshape(-1)[at:at + piece.numel()]
                b.inner.step()
                for _, _, piece, _ in b.pieces:
                    piece.grad = None  # the views must not keep the gradients alive past zero_grad
            if b.replicated:
                continue
            mine = b.flat[self.rank * b.chunk:(self.rank + 1) * b.chunk]
            if b.peers is None:
                works.append(_ALL_GATHER(b.flat, mine, group=self._comm, async_op=True))
                continue
            self._side.wait_stream(compute)  # this block's update
            with torch.cuda.stream(self._side):
                for there in b.remote:
                    there.copy_(mine)
        for w in works:
            w.wait()
        if self._barrier is not None:
            with torch.cuda.stream(self._side):
                self._barrier.barrier(1)  # every rank's copies have landed
            compute.wait_stream(self._side)
        return loss

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_blocks", None) is not None:
            raise NotImplementedError("ShardedOptimizer: parameter groups are fixed at construction (the "
                                      "flat buffers are cut then); build a new one")
        super().add_param_group(param_group)

    def state_dict(self) -> dict:
        """This rank's share of the optimizer state (every rank saves its own), with the options."""
        return {"rank": self.rank, "world": self.world, "rounds": self.rounds, "replicate": self.replicate,
                "param_groups": [_options(g) for g in self.param_groups],
                "inner": [None if b.inner is None else b.inner.state_dict() for b in self._blocks]}

    def load_state_dict(self, state_dict: dict) -> None:
        mine = (self.rank, self.world, self.rounds, self.replicate, len(self._blocks))
        theirs = (state_dict.get("rank"), state_dict.get("world"), state_dict.get("rounds"),
                  state_dict.get("replicate", 0), len(state_dict.get("inner", ())))
        if mine != theirs:
            raise ValueError(f"ShardedOptimizer.load_state_dict: saved by (rank, world, rounds, replicate, blocks) {theirs}, "
                             f"this is {mine}: each rank loads the state it saved")
        for g, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            g.update(saved)
        for b, saved in zip(self._blocks, state_dict["inner"], strict=True):
            if b.inner is not None:
                b.inner.load_state_dict(saved)

    @property
    def peer_bytes(self) -> int:
        """Device bytes of the symmetric blocks (``gather="peer_copy"``): outside the caching
        allocator, so ``torch.cuda.max_memory_allocated`` leaves them out; add them to a peak."""
        return sum(b.peers.nbytes for b in self._blocks if b.peers is not None)

    @property
    def owned_elements(self) -> int:
        """How many parameter elements this rank updates (a replicated block's: all of them)."""
        return sum(piece.numel() for b in self._blocks for _, _, piece, _ in b.pieces)


def _options(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}
