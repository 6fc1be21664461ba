"""The plan: what the passes decided for one compiled region, in a form people and ranks compare.

Passes append to it (``plan.note_*``); the backend hashes it so that every rank can check that
it built the same plan before the first collective runs; ``autosp.explain`` prints it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Site:
    node: str
    kind: str  # "self-attention" or why it is left alone
    rewritten: bool
    detail: str = ""


@dataclass
class Cut:
    node: str
    source: str
    dim: int
    detail: str


@dataclass
class Collective:
    node: str
    kind: str
    bytes_per_step: int  # bytes this rank sends in the forward (the backward moves as many again)
    detail: str = ""


@dataclass
class Fallback:
    node: str
    op: str
    reason: str


@dataclass
class Plan:
    """The decisions for one compiled region (one Dynamo graph)."""

    region: int = 0
    world: int = 1
    rank: int = 0
    seq_len: str | None = None  # the global sequence length S (an int or a symbol), once known
    options: dict[str, Any] = field(default_factory=dict)
    sites: list[Site] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # how each graph input is treated
    cuts: list[Cut] = field(default_factory=list)
    collectives: list[Collective] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    passes: list[tuple[str, str, str]] = field(default_factory=list)  # (pass, code before, code after)
    memory: dict[str, Any] = field(default_factory=dict)  # the memory planner's budget, estimate, timeline; offloaded layers

    @property
    def active(self) -> bool:
        """Whether the region was rewritten for sequence parallelism."""
        return any(s.rewritten for s in self.sites)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def fingerprint(self) -> dict[str, Any]:
        """What every rank of the group must agree on (nothing rank-specific)."""
        return {
            "world": self.world,
            "seq_len": self.seq_len,
            "options": {k: v for k, v in self.options.items() if k not in ("dump_dir",)},
            "sites": [asdict(s) for s in self.sites],
            "cuts": [asdict(c) for c in self.cuts],
            "collectives": [(c.node, c.kind, c.bytes_per_step) for c in self.collectives],
            "fallbacks": [asdict(f) for f in self.fallbacks],
            "outputs": list(self.outputs),
            "offloaded_layers": self.memory.get("offloaded_layers"),  # decides what the backward rematerializes
        }

    def digest(self) -> int:
        """A 63-bit hash of :meth:`fingerprint`."""
        text = json.dumps(self.fingerprint(), sort_keys=True, default=str)
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1

    def collective_bytes(self) -> int:
        return sum(c.bytes_per_step for c in self.collectives)
