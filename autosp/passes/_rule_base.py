"""What every layout rule shares: the Decision a rule returns, the fallback, small helpers.

Layout rules: for each op, the layout of its output and the layouts it needs of its inputs.

A rule is ``rule(node, ctx) -> Decision``. It reads the *global* shapes of the values
(``global_val``: what one device would see) and the layouts the sweep has given the inputs. It
may return rewritten arguments (a view's target shape holds the local length, not S). An op with
no rule, or a case a rule cannot prove, gets ``fallback``: every input made ``Full`` (gathered),
the op run on whole values, a line in the plan. Never a guess.

Legend: S global sequence, L local sequence, P ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from autosp.graph_utils import global_val, tensor_inputs
from autosp.layout import FULL, full
from autosp.passes._context import ShardContext, is_sharded, layout_of


@dataclass
class Decision:
    out: Any  # Layout, or a tuple of Layouts for ops that return several tensors
    need: dict = field(default_factory=dict)  # input node -> (wanted Layout, pad value)
    args: tuple | None = None
    kwargs: dict | None = None
    trim: tuple = ()  # Seq inputs whose padding is dropped before the op (reductions over S)
    fallback: str | None = None
    replace: tuple | None = None  # (target, args): the node is replaced by a new call


def _gv(n):
    return global_val(n)


def _hints(ctx: ShardContext, shape) -> list[int]:
    return [ctx.hint(s) for s in shape]


def _is_float(v) -> bool:
    return isinstance(v, torch.Tensor) and (v.dtype.is_floating_point or v.dtype.is_complex)


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def guess_seq_dim(ctx: ShardContext, value, node: fx.Node | None = None) -> int | None:
    """The one dimension of a tensor whose size is S, or None (none, or ambiguous).

    With ``node``, only when one of its inputs carries the sequence (a tracked dim), and none of
    those has S at another dim too: a weight whose size happens to equal S is never taken for
    the sequence, nor a feature dim of the size of S (hidden 4096 at 4096 tokens) read out of
    a value whose sequence the op moved (a MoE's tokens picked by index).
    """
    if not isinstance(value, torch.Tensor):
        return None
    if node is not None:
        carriers = [n for n in tensor_inputs(node) if _tracked(layout_of(n))]
        if not carriers or any(sum(map(ctx.is_seq_size, global_val(n).shape)) > 1 for n in carriers):
            return None
    dims = [i for i, s in enumerate(value.shape) if ctx.is_seq_size(s)]
    return dims[0] if len(dims) == 1 else None


def _tracked(layout) -> bool:
    if isinstance(layout, tuple):
        return any(_tracked(x) for x in layout)
    return layout is not None and (layout.dim is not None or layout.kind != FULL)


def fallback(node: fx.Node, ctx: ShardContext, reason: str) -> Decision:
    """Make every input Full and run the op on whole values."""
    need = {}
    for n in tensor_inputs(node):
        if is_sharded(layout_of(n)):
            need[n] = (full(), 0)
    out = _gv(node)
    if isinstance(out, (tuple, list)):
        return Decision(out=tuple(full(guess_seq_dim(ctx, o, node)) for o in out), need=need, fallback=reason or None)
    return Decision(out=full(guess_seq_dim(ctx, out, node)), need=need, fallback=(reason if need else None))


def replicated(node: fx.Node, ctx: ShardContext) -> Decision | None:
    """Ops whose tensor inputs are all Full run on every rank as they are."""
    if not any(is_sharded(layout_of(n)) for n in tensor_inputs(node)):
        return fallback(node, ctx, "")
    return None
