"""Layouts: how one value of the graph is spread over the ranks of the sequence-parallel group.

Legend used across autosp: B batch, S global sequence, L local sequence (ceil(S/P)), N heads,
K local heads (N/P), H head dim, D hidden, V vocab, P ranks in the sequence-parallel group.

* ``Full``: every rank holds the whole value (graph inputs, parameters, integer work such as
  label shifting and position ids). ``dim`` says which dimension holds the sequence, if known.
* ``Seq``: this rank holds positions ``[r*L, (r+1)*L)`` of the sequence along ``dim``; the
  global sequence is padded to ``P*L`` so every shard has the same length. The padded positions
  hold finite garbage that never reaches a real position (causal attention, ``-100`` labels,
  masked keys, trimmed reductions and outputs).
* ``Head``: the whole (padded) sequence for a slice of heads along ``dim``: inside attention.
* ``Partial``: a per-rank partial sum (a loss numerator); the value is the sum over ranks.
* ``Rows``: this rank's own rows (a MoE's token-expert pairs) in an order of its own, or a count
  over them: the inside of a routing region (``passes/_token_routing.py``). Never gathered, cut
  or returned; it leaves the region only through the inverse permutation.

A sequence dimension may be flattened with others (``logits.view(-1, V)`` makes ``[B*S, V]``):
``outer`` and ``inner`` are the sizes flattened before and after the sequence, so the dimension
is ``outer * S * inner`` globally and ``outer * L * inner`` on a rank.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL, SEQ, HEAD, PARTIAL, ROWS = "Full", "Seq", "Head", "Partial", "Rows"


@dataclass(frozen=True)
class Layout:
    kind: str
    dim: int | None = None
    outer: int = 1
    inner: int = 1

    def __str__(self) -> str:
        if self.dim is None:
            return self.kind
        flat = f", outer={self.outer}" if self.outer != 1 else ""
        flat += f", inner={self.inner}" if self.inner != 1 else ""
        return f"{self.kind}({self.dim}{flat})"

    def moved(self, dim: int | None, outer: int | None = None, inner: int | None = None) -> Layout:
        """The same kind of layout on another dimension (and flattening)."""
        return Layout(self.kind, dim, self.outer if outer is None else outer, self.inner if inner is None else inner)


def full(dim: int | None = None, outer: int = 1, inner: int = 1) -> Layout:
    return Layout(FULL, dim, outer, inner)


def seq(dim: int, outer: int = 1, inner: int = 1) -> Layout:
    return Layout(SEQ, dim, outer, inner)


def head(dim: int) -> Layout:
    return Layout(HEAD, dim)


PARTIAL_SUM = Layout(PARTIAL)
