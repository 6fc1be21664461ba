"""graph_utils: dead-code elimination keeps ops that write in place."""

import torch
import torch.fx as fx

from autosp.graph_utils import eliminate_dead_code, writes_in_place


def _f(x):
    y = x.clone()
    y.add_(1)  # result unused, y is
    torch.relu_(y)
    dead = x * 3  # noqa: F841 - really dead
    return y * 2


def test_in_place_ops_survive_and_dead_ones_go():
    gm = fx.symbolic_trace(_f)
    eliminate_dead_code(gm.graph)
    gm.recompile()
    x = torch.randn(4)
    torch.testing.assert_close(gm(x), _f(x))
    assert sum(writes_in_place(n) for n in gm.graph.nodes) == 2
    assert "mul(x, 3)" not in gm.code and "x * 3" not in gm.code


def test_writes_in_place():
    import operator

    g = fx.Graph()
    x = g.placeholder("x")
    assert writes_in_place(g.call_method("add_", (x, 1)))
    assert writes_in_place(g.call_function(operator.setitem, (x, 0, 1)))
    assert writes_in_place(g.call_function(operator.iadd, (x, 1)))
    assert not writes_in_place(g.call_function(operator.and_, (x, x)))
    assert not writes_in_place(g.call_method("add", (x, 1)))
    assert not writes_in_place(g.call_method("__and__", (x, x)))
