"""The collectives autosp inserts into graphs, built on torch's functional collectives.

Each function here is the target of one graph node, so that a rewritten graph reads as
``q_BKSH = autosp.collectives.seq_to_head(q_BNLH, ...)``. They are plain functions over
functional collectives (groups by name, autograd-aware, with fake implementations), so
AOTAutograd traces through them, derives the backward, and Inductor can schedule them.

Gradient convention (see autosp/passes/README.md): on every rank the backward computes
``P x`` the true gradient of values this rank holds alone (``Seq``, ``Head``, ``Partial``) and a
gradient whose mean over ranks is the true one for replicated values (``Full``, parameters).
Under it the transposes are: slice <-> zero-pad, all-gather <-> reduce-scatter(sum),
all-reduce(sum) <-> all-reduce(sum), all-to-all <-> the inverse all-to-all. The parameter
gradients of a rank are then partial, and their mean over the group is the one-device gradient.

Legend: B batch, N heads, K local heads (N/P), L local sequence, S padded global sequence
(P*L), H head dim, P ranks.
"""

from __future__ import annotations

import math

import torch

from autosp._torch_private import all_to_all_unwaited, functional_collectives, resolve_group
from autosp.kernels.embedding_grad import embedding_grad


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: the backward of a functional
    collective hands its gradient straight to the backend, and NCCL (and gloo on torch 2.11)
    reject strided gradients such as those of a ``movedim``."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def is_collective(target) -> bool:
    """Whether a graph node's target is one of the collectives here (never recomputed)."""
    return getattr(target, "__module__", None) == __name__


def _wait(x: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(functional_collectives().wait_tensor(x))


def _all_to_all_dim0(x: torch.Tensor, group_name: str) -> torch.Tensor:
    fc = functional_collectives()
    return _wait(fc.all_to_all_single_autograd(x.contiguous(), None, None, group_name))


def seq_to_head(x: torch.Tensor, group_name: str, world: int, seq_dim: int, head_dim: int) -> torch.Tensor:
    """``[.., N, .., L, ..]`` (sequence shard, all heads) -> ``[.., K, .., S, ..]`` (all positions, K=N/P heads).

    Rank r receives head chunk r from every rank and lays the sequence chunks out in rank order.
    """
    x = x.unflatten(head_dim, (world, -1))  # N -> (P, K)
    y = _all_to_all_dim0(torch.movedim(x, head_dim, 0), group_name)  # [P(src), ..K.., L, ..]
    # dim 0 holds the source rank = the sequence chunk: put it just before L and merge.
    y = torch.movedim(y, 0, seq_dim)
    return y.flatten(seq_dim, seq_dim + 1)


def seq_to_head_many(xs: list[torch.Tensor], group_name: str, world: int, seq_dim: int, head_dim: int
                     ) -> list[torch.Tensor]:
    """:func:`seq_to_head` of several tensors (q, k, v, each at its own head count) in ONE
    all-to-all: every rank's head chunks of all of them travel in one buffer, so a layer pays one
    collective's latency instead of three, and its backward (the inverse all-to-all of the
    packed gradient) likewise. Equal to calling :func:`seq_to_head` on each."""
    packed = pack_head_chunks(xs, world, head_dim)
    return unpack_head_chunks(_all_to_all_dim0(packed, group_name), xs, world, seq_dim, head_dim)


def pack_head_chunks(xs: list[torch.Tensor], world: int, head_dim: int) -> torch.Tensor:
    """``[P, sum(numel / P)]``: row r holds head chunk r of every tensor of ``xs``, in order."""
    return torch.cat([_heads_first(x, world, head_dim).reshape(world, -1) for x in xs], dim=1)


def unpack_head_chunks(y: torch.Tensor, xs: list[torch.Tensor], world: int, seq_dim: int, head_dim: int
                       ) -> list[torch.Tensor]:
    """The inverse of :func:`pack_head_chunks` after the all-to-all (row = source rank = sequence
    chunk), each tensor laid out as :func:`seq_to_head` lays it out."""
    return unpack_head_rows(y, [list(x.shape) for x in xs], world, seq_dim, head_dim)


def unpack_head_rows(y: torch.Tensor, shapes: list[list[int]], world: int, seq_dim: int, head_dim: int
                     ) -> list[torch.Tensor]:
    """:func:`unpack_head_chunks` given the sequence shards' shapes instead of the shards."""
    moved = [[world, *s[:head_dim], s[head_dim] // world, *s[head_dim + 1:]] for s in shapes]
    pieces = torch.split(y, [math.prod(m) // world for m in moved], dim=1)
    return [torch.movedim(p.reshape(m), 0, seq_dim).flatten(seq_dim, seq_dim + 1)
            for p, m in zip(pieces, moved, strict=True)]


def exchange_start(rows: torch.Tensor, group_name: str, world: int, rank: int) -> torch.Tensor:
    """Issue the all-to-all of this rank's rows for the other ranks (``rows``: ``[P - 1, n]``, in
    destination order, this rank's own row left out) and return without waiting: what comes
    back (the other ranks' rows for this one) is read through :func:`exchange_finish`. Ops the
    graph puts between the two run while the rows cross (autosp/passes/split_projections.py)."""
    n = rows.shape[1]
    splits = [0 if d == rank else n for d in range(world)]
    return _Exchange.apply(rows.contiguous().reshape(-1), splits, group_name)


class _Exchange(torch.autograd.Function):
    """The all-to-all of :func:`exchange_start`, not waited for; its backward sends the gradients
    of what came in back where it came from (the same splits: every rank sends and receives n to
    and from each other rank) and waits."""

    @staticmethod
    def forward(ctx, flat, splits, group_name):
        ctx.splits, ctx.group_name = splits, group_name
        return all_to_all_unwaited(flat, splits, splits, group_name)

    @staticmethod
    def backward(ctx, grad):
        sent = all_to_all_unwaited(grad.contiguous(), ctx.splits, ctx.splits, ctx.group_name)
        return functional_collectives().wait_tensor(sent), None, None


def exchange_finish(received: torch.Tensor, own_row: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """``[P, n]``, row s from rank s: the rows :func:`exchange_start` received, with this rank's own
    row (which never left it) at row ``rank``: what one all-to-all of all P rows returns."""
    got = _wait(received).view(world - 1, -1)
    return torch.cat([got[:rank], own_row.reshape(1, -1), got[rank:]], dim=0)


def _heads_first(x: torch.Tensor, world: int, head_dim: int) -> torch.Tensor:
    return torch.movedim(x.unflatten(head_dim, (world, -1)), head_dim, 0)  # [P, ..K.., L, ..]


def head_to_seq(x: torch.Tensor, group_name: str, world: int, seq_dim: int, head_dim: int) -> torch.Tensor:
    """``[.., K, .., S, ..]`` -> ``[.., N, .., L, ..]``: the inverse of :func:`seq_to_head`."""
    x = x.unflatten(seq_dim, (world, -1))  # S -> (P, L)
    y = _all_to_all_dim0(torch.movedim(x, seq_dim, 0), group_name)  # [P(src), ..K.., L, ..]
    y = torch.movedim(y, 0, head_dim)  # source rank = head chunk: just before K
    return y.flatten(head_dim, head_dim + 1)


def gather_seq(x: torch.Tensor, group_name: str, world: int, dim: int, outer: int, inner: int) -> torch.Tensor:
    """All-gather the sequence shards along ``dim`` (which holds ``outer * L * inner``), padded length."""
    fc = functional_collectives()
    if outer != 1 or inner != 1:
        x = x.unflatten(dim, (outer, -1, inner))
        y = _wait(fc.all_gather_tensor_autograd(x.contiguous(), dim + 1, group_name))
        return y.flatten(dim, dim + 2)
    return _wait(fc.all_gather_tensor_autograd(x.contiguous(), dim, group_name))


class _MeanGrad(torch.autograd.Function):
    """Identity whose backward replaces the gradient by its mean over the group."""

    @staticmethod
    def forward(ctx, x, group_name, world):
        ctx.group_name, ctx.world = group_name, world
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        fc = functional_collectives()
        if _averages(ctx.group_name, grad.device.type):  # the mean in the collective: no division kernel after it
            return fc.all_reduce(grad.contiguous(), "avg", ctx.group_name), None, None
        return fc.all_reduce(grad.contiguous(), "sum", ctx.group_name) / ctx.world, None, None


def _averages(group_name: str, device_type: str) -> bool:
    """Whether the group's backend for tensors on ``device_type`` takes an average all-reduce:
    NCCL does (gloo does not). The division after a sum all-reduce is one more kernel a
    parameter, at the end of the backward where the gradients' waits are (1.1 ms a step at 16K
    on 2x H200, 146 gradients)."""
    return backend_for(torch.distributed.get_backend(resolve_group(group_name)), device_type) == "nccl"


def backend_for(backend: str, device_type: str) -> str | None:
    """The backend of a group's backend string for one device type: ``"nccl"`` -> ``"nccl"``;
    ``"cpu:gloo,cuda:nccl"`` (a group made with one backend a device) -> ``"nccl"`` for
    ``"cuda"``, ``"gloo"`` for ``"cpu"``, None for a device it does not name."""
    if ":" not in backend:
        return backend
    pairs = dict(part.split(":", 1) for part in backend.split(","))
    return pairs.get(device_type)


def mean_grad(x: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    """``x`` itself (a view); the gradient that reaches ``x`` becomes its mean over the group: one
    all-reduce in the backward (an average on NCCL, a sum and ``/ P`` elsewhere), issued where
    the backward has finished the gradient (the grad_reduce pass puts one on every parameter)."""
    return _MeanGrad.apply(x, group_name, world)


class _EmbeddingGatheredGrad(torch.autograd.Function):
    """``F.embedding`` of a sequence shard whose weight gradient is the group's mean, made without
    reducing the table: the backward gathers every rank's token gradients and each rank computes
    the embedding backward of the whole sequence."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, group_name, world, seq_dim, all_ids):
        fc = functional_collectives()
        if all_ids is None:
            all_ids = fc.wait_tensor(fc.all_gather_tensor(ids.contiguous(), seq_dim, group_name))
        ctx.save_for_backward(all_ids)
        ctx.rows, ctx.padding_idx, ctx.group_name, ctx.world, ctx.seq_dim = \
            weight.shape[0], padding_idx, group_name, world, seq_dim
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (all_ids,) = ctx.saved_tensors
        fc = functional_collectives()
        tokens = fc.wait_tensor(fc.all_gather_tensor(grad.contiguous(), ctx.seq_dim, ctx.group_name))
        padding = -1 if ctx.padding_idx is None else ctx.padding_idx
        # torch's deterministic kernel, not Inductor's atomic adds: every rank must make the same bits
        weight_grad = embedding_grad(tokens / ctx.world, all_ids, ctx.rows, padding)
        return None, weight_grad, None, None, None, None, None


def embedding_gathered_grad(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, group_name: str,
                            world: int, seq_dim: int, all_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``F.embedding(ids, weight, padding_idx)`` of a sequence shard ``ids`` (sequence along
    ``seq_dim``). Its weight gradient is already the group's mean on every rank: the backward
    all-gathers the token gradients (``P x`` the true ones under the gradient convention, hence
    the ``/ P``) and the ids (gathered in the forward), and runs the embedding backward of the
    whole sequence (``autosp::embedding_grad``: deterministic, so every rank makes the same bits
    and the ranks' copies of the table stay equal). For the grad_reduce pass: that moves
    ``B x S x D`` instead of all-reducing the ``V x D`` table after the last layer's backward
    (at 16K tokens and a Llama-3 vocabulary, 64 MiB against 500 MiB), and leaves nothing to
    average. Exact where ``P`` is a power of two (the ``/ P`` only moves the exponent).

    ``all_ids``: every rank's ``ids`` side by side (the padded sequence), where the caller has them
    without communication (the whole ids every rank was given, padded as :func:`shard_seq` pads
    them): then the forward gathers nothing."""
    return _EmbeddingGatheredGrad.apply(ids, weight, padding_idx, group_name, world, seq_dim, all_ids)


def pad_to_shards(x: torch.Tensor, world: int, dim: int, length, pad_value) -> torch.Tensor:
    """The whole value padded as :func:`shard_seq` pads it before cutting: its ``P`` shards side by
    side, what gathering them returns."""
    return pad_dim(x, dim, (length + world - 1) // world * world - length, pad_value)


def all_reduce_sum(x: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    """Sum of ``x`` over the group, differentiable (its backward is the same sum of gradients)."""
    fc = functional_collectives()
    gathered = _wait(fc.all_gather_tensor_autograd(x.unsqueeze(0).contiguous(), 0, group_name))
    return gathered.sum(0)


def shard_seq(x: torch.Tensor, rank: int, world: int, dim: int, length: int, outer: int, inner: int, pad_value):
    """This rank's shard of a full value: pad the sequence ``length`` to ``P*L``, take ``[r*L, (r+1)*L)``.

    Local, no communication; its backward zero-pads the gradient, as the convention wants.
    """
    if outer != 1 or inner != 1:
        x = x.unflatten(dim, (outer, length, inner))
        return shard_seq(x, rank, world, dim + 1, length, 1, 1, pad_value).flatten(dim, dim + 2)
    local = (length + world - 1) // world
    return pad_to_shards(x, world, dim, length, pad_value).narrow(dim, rank * local, local)


def pad_dim(x: torch.Tensor, dim: int, amount, value) -> torch.Tensor:
    """Append ``amount`` positions filled with ``value`` along ``dim`` (``amount`` may be symbolic)."""
    if isinstance(amount, int) and amount == 0:
        return x
    shape = list(x.shape)
    shape[dim] = amount
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def unshard_seq(x: torch.Tensor, dim: int, length: int, outer: int, inner: int) -> torch.Tensor:
    """Drop the padding of a sequence dimension: keep the first ``length`` positions (contiguous,
    as one device would hold them)."""
    if outer != 1 or inner != 1:
        x = x.unflatten(dim, (outer, -1, inner))
        return x.narrow(dim + 1, 0, length).flatten(dim, dim + 2)
    return x.narrow(dim, 0, length).contiguous()
