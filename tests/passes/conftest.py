"""Fixtures shared by the tests of the passes that run on AOTAutograd's partitioned graphs."""

from __future__ import annotations

import copy

import pytest

from autosp import _torch_private


@pytest.fixture
def graphs(monkeypatch):
    """The partitioned graphs the backend compiled: ``"fw"`` and ``"bw"`` after its hooks ran
    (offload, reload, rematerialize, ...), ``"bw_before"`` a copy of the backward before them.
    Empty when the backend did not take the partitioned path."""
    seen = {}
    monkeypatch.setattr(_torch_private, "compile_partitioned", partitioned_spy(seen))
    return seen


def partitioned_spy(seen: dict):
    """A ``compile_partitioned`` that records the graphs its hooks saw into ``seen`` (see
    ``graphs``); for processes a fixture does not reach, which install it themselves."""
    real = _torch_private.compile_partitioned

    def spy(gm, inputs, compiler, forward_hook, backward_hook, *more):
        def fw(g, i):
            out = forward_hook(g, i)
            seen["fw"] = g
            return out

        def bw(g, i):
            seen["bw_before"] = copy.deepcopy(g)
            out = backward_hook(g, i)
            seen["bw"] = g
            return out

        return real(gm, inputs, compiler, fw, bw, *more)

    return spy
