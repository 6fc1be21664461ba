"""What the passes share about one region: the group, the sequence length, conversions between layouts.

``ShardContext`` owns the emitters of every layout conversion (Full -> Seq cut, Seq -> Full
gather, Partial -> Full all-reduce, Seq <-> Head all-to-all), so each conversion is written once
and recorded in the plan once.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from autosp import collectives
from autosp._torch_private import is_symbolic, same_size, size_hint
from autosp.graph_utils import aliases, global_val, new_node, target_name, tensor_bytes, val
from autosp.layout import FULL, HEAD, PARTIAL, SEQ, Layout
from autosp.plan import Collective, Cut, Fallback, Plan

LAYOUT = "autosp.layout"
SEQ_DIM = "autosp.seq_dim"  # on placeholders: the dimension that holds the sequence
SITE = "autosp.site"  # on attention nodes: how the site is treated
GLOBAL_VAL = "autosp.global_val"  # a node's value as one device sees it (set before sharding)


@dataclass
class ShardContext:
    graph: fx.Graph
    fake_mode: Any
    plan: Plan
    world: int
    rank: int
    group_name: str
    seq_len: Any  # S: int or SymInt (the value, from the attention's query)
    _cache: dict = field(default_factory=dict)
    decided: dict = field(default_factory=dict)  # node -> Decision made ahead by a region's rule (a routing region)
    visit: Any = None  # the sweep: give a node not reached yet its layout now (and its inputs theirs)
    _s_node: Any = None
    _l_node: Any = None

    # ---------------------------------------------------------------- sizes as graph values
    @property
    def dynamic(self) -> bool:
        return is_symbolic(self.seq_len)

    def s_arg(self):
        """S as an argument of a new node: an int, or a node that computes it."""
        if not self.dynamic:
            return self.seq_len
        if self._s_node is None:
            self._s_node = self._find_size_node()
        return self._s_node

    def l_arg(self):
        """L = ceil(S / P) as an argument of a new node."""
        if not self.dynamic:
            return -(-self.seq_len // self.world)
        if self._l_node is None:
            s = self.s_arg()
            with self.graph.inserting_after(s):
                plus = new_node(self.graph, operator.add, (s, self.world - 1), like=None, fake_mode=self.fake_mode)
            with self.graph.inserting_after(plus):
                self._l_node = new_node(
                    self.graph, operator.floordiv, (plus, self.world), like=None, fake_mode=self.fake_mode
                )
        return self._l_node

    def valid_local_arg(self, at: fx.Node):
        """How many of this rank's L positions are real (not padding): clamp(S - r*L, 0, L)."""
        if not self.dynamic:
            local = -(-self.seq_len // self.world)
            return max(0, min(local, self.seq_len - self.rank * local))
        with self.graph.inserting_before(at):
            start = self._emit(operator.mul, (self.l_arg(), self.rank), at)
            left = self._emit(operator.sub, (self.s_arg(), start), at)
            low = self._emit(torch.sym_max, (left, 0), at)
            return self._emit(torch.sym_min, (low, self.l_arg()), at)

    def is_seq_size(self, size: Any) -> bool:
        return same_size(size, self.seq_len)

    def _find_size_node(self) -> fx.Node:
        for node in self.graph.nodes:
            if node.op == "placeholder" and is_symbolic(val(node)) and same_size(val(node), self.seq_len):
                return node
        for node in self.graph.nodes:
            if node.op == "placeholder" and SEQ_DIM in node.meta:
                with self.graph.inserting_after(node):
                    return new_node(
                        self.graph,
                        torch.ops.aten.sym_size.int,
                        (node, node.meta[SEQ_DIM]),
                        like=None,
                        fake_mode=self.fake_mode,
                    )
        raise ValueError("autosp: the sequence length is symbolic but no graph input carries it")

    def _emit(self, target, args, like, kwargs=None):
        return new_node(self.graph, target, args, kwargs, like=like, fake_mode=self.fake_mode)

    # ---------------------------------------------------------------- conversions
    def convert(self, node: fx.Node, have: Layout, want: Layout, user: fx.Node, pad_value: Any = 0) -> fx.Node:
        """A node holding ``node``'s value in layout ``want``, inserted before ``user`` (cached)."""
        if have == want:
            return node
        key = (node, want, pad_value)
        if key in self._cache:
            return self._cache[key]
        with self.graph.inserting_before(user):
            out = self._convert(node, have, want, user, pad_value)
        out.meta[LAYOUT] = want
        out.meta[GLOBAL_VAL] = global_val(node)
        self._cache[key] = out
        return out

    def _convert(self, node, have, want, user, pad_value):
        if have.kind == FULL and want.kind == SEQ:
            return self.cut(node, want, user, pad_value)
        if have.kind == SEQ and want.kind == FULL:
            return self.gather(node, have, user)
        if have.kind == PARTIAL and want.kind == FULL:
            out = self._emit(collectives.all_reduce_sum, (node, self.group_name, self.world), user)
            self._record(out, "all_reduce(sum)", node, "partial sums -> full value")
            return out
        if have.kind == SEQ and want.kind == SEQ:  # same dim, other flattening: go through Full
            return self.cut(self.gather(node, have, user), want, user, pad_value)
        raise NotImplementedError(f"autosp: no conversion {have} -> {want} for {node.name}")

    def forget(self, node: fx.Node) -> None:
        """Drop the conversions made so far of ``node`` and of the values it shares memory with
        (its bases and views): it was written into, so they are stale."""
        stale = aliases(node)
        for key in [k for k in self._cache if k[0] in stale]:
            del self._cache[key]

    def cut(self, node: fx.Node, want: Layout, user: fx.Node, pad_value: Any) -> fx.Node:
        """Full -> Seq: pad the sequence to P*L and keep this rank's L positions (no communication)."""
        args = (node, self.rank, self.world, want.dim, self.s_arg(), want.outer, want.inner, pad_value)
        out = self._emit(collectives.shard_seq, args, user)
        self.plan.cuts.append(
            Cut(
                node=out.name,
                source=node.name,
                dim=want.dim,
                detail=f"{node.name} {list(global_val(node).shape)} -> {list(val(out).shape)} before "
                f"{target_name(user)} ({user.name})",
            )
        )
        return out

    def gather(self, node: fx.Node, have: Layout, user: fx.Node) -> fx.Node:
        """Seq -> Full: all-gather the shards along the sequence, then drop the padding."""
        g = self._emit(
            collectives.gather_seq, (node, self.group_name, self.world, have.dim, have.outer, have.inner), user
        )
        self._record(g, "all_gather", node, f"{node.name} to full length for {target_name(user)}")
        return self._emit(collectives.unshard_seq, (g, have.dim, self.s_arg(), have.outer, have.inner), user)

    def trim(self, node: fx.Node, have: Layout, user: fx.Node) -> fx.Node:
        """Seq -> this rank's real positions only (drops padding before a reduction over the sequence)."""
        if not self.dynamic and self.seq_len % self.world == 0:
            return node
        key = (node, "trim")
        if key not in self._cache:
            n_valid = self.valid_local_arg(user)
            with self.graph.inserting_before(user):
                self._cache[key] = self._emit(
                    collectives.unshard_seq, (node, have.dim, n_valid, have.outer, have.inner), user
                )
            self._cache[key].meta[LAYOUT] = have
            self._cache[key].meta[GLOBAL_VAL] = global_val(node)
        return self._cache[key]

    def seq_to_head(self, node: fx.Node, seq_dim: int, head_dim: int, user: fx.Node) -> fx.Node:
        with self.graph.inserting_before(user):
            out = self._emit(collectives.seq_to_head, (node, self.group_name, self.world, seq_dim, head_dim), user)
        out.meta[LAYOUT] = Layout(HEAD, head_dim)
        self._record(out, "all_to_all", node, f"{node.name}: sequence shard -> head shard")
        return out

    def seq_to_head_many(self, nodes: list[fx.Node], seq_dim: int, head_dim: int, user: fx.Node) -> list[fx.Node]:
        """One all-to-all for several sequence shards (q, k, v): their head-sharded values."""
        with self.graph.inserting_before(user):
            packed = self._emit(collectives.seq_to_head_many,
                                (list(nodes), self.group_name, self.world, seq_dim, head_dim), user)
            outs = [self._emit(operator.getitem, (packed, i), user) for i in range(len(nodes))]
        for out in outs:
            out.meta[LAYOUT] = Layout(HEAD, head_dim)
        names = ", ".join(n.name for n in nodes)
        self._record(packed, "all_to_all", nodes, f"{names}: sequence shards -> head shards, one buffer")
        return outs

    def head_to_seq(self, node: fx.Node, seq_dim: int, head_dim: int, user: fx.Node) -> fx.Node:
        out = self._emit(collectives.head_to_seq, (node, self.group_name, self.world, seq_dim, head_dim), user)
        out.meta[LAYOUT] = Layout(SEQ, seq_dim)
        self._record(out, "all_to_all", node, f"{node.name}: head shard -> sequence shard")
        return out

    def _record(self, out: fx.Node, kind: str, source: fx.Node | list[fx.Node], detail: str) -> None:
        nbytes = sum(tensor_bytes(val(n)) for n in (source if isinstance(source, list) else [source]))
        self.plan.collectives.append(Collective(node=out.name, kind=kind, bytes_per_step=nbytes, detail=detail))

    def fallback(self, node: fx.Node, reason: str) -> None:
        self.plan.fallbacks.append(Fallback(node=node.name, op=target_name(node), reason=reason))

    # ---------------------------------------------------------------- shape helpers
    def hint(self, x: Any) -> int:
        return size_hint(x)


def layout_of(node: Any) -> Layout | None:
    if isinstance(node, fx.Node):
        return node.meta.get(LAYOUT)
    return None


def is_sharded(layout: Any) -> bool:
    """Whether a layout (or any layout of a tuple of them) is not Full."""
    if isinstance(layout, tuple):
        return any(is_sharded(x) for x in layout)
    return layout is not None and layout.kind != FULL
