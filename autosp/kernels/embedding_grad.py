"""``autosp::embedding_grad``: an embedding table's gradient, the same bits wherever it runs.

The embedding's backward sums each token's gradient into its row of the table. Inductor lowers
torch's ``embedding_dense_backward`` to atomic adds, whose order (and so the last bits of a row
hit by several tokens) differs from run to run: measured on CPU, 29 runs of 30 differed from
the first. That is harmless where one process owns the table, and wrong where several ranks each
compute the same table's gradient and must agree on it bit for bit (``collectives.
embedding_gathered_grad``: each rank makes the table's gradient from the gathered token
gradients, and the ranks' copies of the table would otherwise drift apart step by step).

This op is opaque to Inductor, which calls it as it is: torch's own kernel, which on CUDA sorts
the ids and sums each row's tokens in a fixed order, and on CPU splits the rows among threads
and adds each row's tokens in order. Both are deterministic, so equal inputs give equal bits
on every rank. Same arguments as ``aten.embedding_dense_backward`` with no scaling by
frequency.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("autosp::embedding_grad", mutates_args=())
def embedding_grad(grad: torch.Tensor, ids: torch.Tensor, rows: int, padding_idx: int) -> torch.Tensor:
    """``[rows, D]``: the sum of ``grad``'s ``[..., D]`` rows into the rows ``ids`` names (``padding_idx``
    gets none; -1: no padding row)."""
    return torch.ops.aten.embedding_dense_backward(grad, ids, rows, padding_idx, False)


@embedding_grad.register_fake
def _(grad, ids, rows, padding_idx):
    return grad.new_empty((rows, grad.shape[-1]))
