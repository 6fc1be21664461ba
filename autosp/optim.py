"""ShardedOptimizer: the optimizer step split over the sequence-parallel ranks (ZeRO stage 1).

Sequence parallelism replicates the parameters, so after the gradient mean every rank would run
the same optimizer step on the same numbers: at 16K tokens on 2 GPUs that repeated AdamW step
(1.2B parameters) costs more than every collective the step leaves exposed. Here each rank
updates a disjoint 1/P of the elements and the ranks exchange the updated values::

    opt = autosp.ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-5, fused=True)
    loss.backward()                  # gradients the group mean (overlap_grad_reduce, or reduce_gradients)
    opt.step()                       # this rank's 1/P of the elements, then an all-gather of them
    opt.zero_grad(set_to_none=True)

The parameters of one dtype move into one flat buffer (each ``p.data`` becomes a view of it:
the model reads them as before). The buffer is cut into ``rounds`` equal blocks and each block
into P equal chunks; rank r owns chunk r of every block, as views of the parameters that fall in
it (a chunk may cut a parameter anywhere: the update of an elementwise optimizer does not care)::

    flat  = [ block 0: chunk r0 | chunk r1 ][ block 1: chunk r0 | chunk r1 ] ... padding
    step:   update own chunk of block 0; all_gather(block 0)   <- runs while block 1 is updated
            update own chunk of block 1; all_gather(block 1)
            ...
            wait (the device stream waits; the host does not)

Each block's all-gather is in place (the rank's chunk is already where the gather puts it) and
starts as soon as the block is updated, so it runs beside the next block's update: the step
costs one rank's share of the update and one block's all-gather. Optimizer states exist for the
owned elements only (AdamW: 2 x params / P fewer bytes on every rank). Every element has one
owner, so the replicas stay bit-identical.

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

# torch 2.13 renamed all_gather_into_tensor (the old name warns); torch 2.11 has only the old one
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.Adamax,
               torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop)


class _Round:
    """One block of one flat buffer: this rank's pieces of it, their optimizer, and where they lie."""

    def __init__(self, flat: torch.Tensor, start: int, chunk: int, pieces: list[tuple[int, torch.nn.Parameter,
                 torch.Tensor, int]], inner: torch.optim.Optimizer | None, groups: list[int]):
        self.flat, self.start, self.chunk = flat, start, chunk
        self.pieces = pieces  # (group index, parameter, piece: a view of the flat buffer, offset in the parameter)
        self.inner = inner  # None when this rank owns nothing in the block (padding)
        self.groups = groups  # the outer group index of each of inner's param groups


class ShardedOptimizer(torch.optim.Optimizer):
    """``optimizer_class`` over this rank's 1/P of every parameter's elements; ``step`` updates them
    and all-gathers the block it updated while it updates the next (module docstring).

    ``params``: as for any optimizer (tensors, or dicts of groups with their own options);
    ``group``: the ranks that hold the same parameters (the sequence-parallel group; default the
    world); ``rounds``: blocks per flat buffer (the last block's all-gather is not hidden);
    ``defaults``: ``optimizer_class``'s options. Build it before the first step: it moves the
    parameters into flat buffers.
    """

    def __init__(self, params: Iterable, optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW, *,
                 group: dist.ProcessGroup | None = None, rounds: int = 8, **defaults: Any):
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, ELEMENTWISE)):
            raise ValueError(f"ShardedOptimizer: {optimizer_class!r} is not one of the elementwise optimizers "
                             f"({', '.join(c.__name__ for c in ELEMENTWISE)}): its update may read a whole "
                             "tensor, and each rank holds pieces")
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
            raise ValueError(f"ShardedOptimizer: rounds must be a positive int, got {rounds!r}")
        if group is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("ShardedOptimizer needs an initialized process group (torch.distributed)")
            group = dist.group.WORLD
        super().__init__(params, defaults)
        self.optimizer_class, self.group, self.rounds = optimizer_class, group, rounds
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self._rounds = self._shard()
        for i, g in enumerate(self.param_groups):  # every option the inner optimizer filled in, shown here
            for r in self._rounds:
                if r.inner is not None and i in r.groups:
                    for k, v in r.inner.param_groups[r.groups.index(i)].items():
                        g.setdefault(k, v)
                    break

    def _shard(self) -> list[_Round]:
        """Move the parameters into one flat buffer per dtype; make this rank's pieces and their
        optimizers, one per block."""
        by_dtype: dict[torch.dtype, list[tuple[int, torch.nn.Parameter]]] = {}
        devices = set()
        for i, g in enumerate(self.param_groups):
            for p in g["params"]:
                by_dtype.setdefault(p.dtype, []).append((i, p))
                devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(f"ShardedOptimizer: parameters on several devices ({sorted(map(str, devices))})")
        rounds = []
        for entries in by_dtype.values():
            total = sum(p.numel() for _, p in entries)
            chunk = max(1, math.ceil(total / (self.world * self.rounds)))
            flat = torch.zeros(chunk * self.world * self.rounds, dtype=entries[0][1].dtype,
                               device=entries[0][1].device)
            spans, offset = [], 0
            with torch.no_grad():
                for i, p in entries:
                    n = p.numel()
                    flat[offset:offset + n].copy_(p.reshape(-1))
                    p.data = flat[offset:offset + n].view(p.shape)
                    spans.append((i, p, offset, n))
                    offset += n
            for k in range(self.rounds):
                start = k * self.world * chunk
                lo, hi = start + self.rank * chunk, start + (self.rank + 1) * chunk
                pieces = [(i, p, flat[max(o, lo):min(o + n, hi)], max(o, lo) - o)
                          for i, p, o, n in spans if o < hi and o + n > lo]
                rounds.append(self._round(flat, start, chunk, pieces))
        return rounds

    def _round(self, flat, start, chunk, pieces) -> _Round:
        order = sorted({i for i, *_ in pieces})
        if not order:
            return _Round(flat, start, chunk, pieces, None, [])
        groups = [{**_options(self.param_groups[i]), "params": [piece for j, _, piece, _ in pieces if j == i]}
                  for i in order]
        return _Round(flat, start, chunk, pieces, self.optimizer_class(groups, **self.defaults), order)

    @torch.no_grad()
    def step(self, closure=None):
        """Update this rank's elements, block by block, each block's all-gather started as soon as
        it is updated; the current stream waits for the last of them before it returns."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        works = []
        for r in self._rounds:
            if r.inner is not None:
                for j, i in enumerate(r.groups):  # options a scheduler changed since the last step
                    r.inner.param_groups[j].update(_options(self.param_groups[i]))
                for _, p, piece, at in r.pieces:
                    piece.grad = None if p.grad is None else p.grad.reshape(-1)[at:at + piece.numel()]
                r.inner.step()
                for _, _, piece, _ in r.pieces:
                    piece.grad = None  # the views must not keep the gradients alive past zero_grad
            block = r.flat[r.start:r.start + self.world * r.chunk]
            mine = block[self.rank * r.chunk:(self.rank + 1) * r.chunk]
            works.append(_ALL_GATHER(block, mine, group=self.group, async_op=True))
        for w in works:
            w.wait()
        return loss

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_rounds", None) is not None:
            raise NotImplementedError("ShardedOptimizer: parameter groups are fixed at construction (the "
                                      "flat buffers are cut then); build a new one")
        super().add_param_group(param_group)

    def state_dict(self) -> dict:
        """This rank's share of the optimizer state (every rank saves its own), with the options."""
        return {"rank": self.rank, "world": self.world, "rounds": self.rounds,
                "param_groups": [_options(g) for g in self.param_groups],
                "inner": [None if r.inner is None else r.inner.state_dict() for r in self._rounds]}

    def load_state_dict(self, state_dict: dict) -> None:
        mine = (self.rank, self.world, self.rounds, len(self._rounds))
        theirs = (state_dict.get("rank"), state_dict.get("world"), state_dict.get("rounds"),
                  len(state_dict.get("inner", ())))
        if mine != theirs:
            raise ValueError(f"ShardedOptimizer.load_state_dict: saved by (rank, world, rounds, blocks) {theirs}, "
                             f"this is {mine}: each rank loads the state it saved")
        for g, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            g.update(saved)
        for r, saved in zip(self._rounds, state_dict["inner"], strict=True):
            if r.inner is not None:
                r.inner.load_state_dict(saved)

    @property
    def owned_elements(self) -> int:
        """How many parameter elements this rank updates."""
        return sum(piece.numel() for r in self._rounds for _, _, piece, _ in r.pieces)


def _options(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}
