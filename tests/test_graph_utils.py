"""graph_utils: dead-code elimination keeps ops that write in place; writes through aliases are seen."""

import torch
import torch.fx as fx

from autosp.graph_utils import eliminate_dead_code, writes_in_place, written_in_place


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
    assert writes_in_place(g.call_function(torch.neg, (x,), {"out": x}))
    # found by review: aten overloads (their name is "fill_.Scalar"), _foreach_ ops, in-place dunders
    assert writes_in_place(g.call_function(torch.ops.aten.fill_.Scalar, (x, 0)))
    assert writes_in_place(g.call_function(torch.ops.aten.add.out, (x, x), {}))
    assert not writes_in_place(g.call_function(torch.ops.aten.add.Tensor, (x, x)))
    assert writes_in_place(g.call_function(torch._foreach_add_, ([x], 1)))
    assert not writes_in_place(g.call_function(torch._foreach_add, ([x], 1)))
    assert writes_in_place(g.call_method("__iadd__", (x, 1)))


def _alias_writes(x):
    a = x.clone()
    b = x.clone()
    c = x.clone()
    a.long().mul_(-1)  # int64: .long() is a itself
    torch.narrow(b, 0, 0, 2).zero_()  # a view made by a function
    torch.neg(x, out=c)
    d = x.clone()
    return a + b + c + d


def test_written_in_place_sees_aliases_of_the_same_storage():
    """Dynamo's fake values share storage where the tensors do; a write into any alias counts."""
    seen = {}

    def backend(gm, example_inputs):
        seen["gm"] = gm
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_alias_writes, backend=backend)(torch.arange(4))
    clones = [n for n in seen["gm"].graph.nodes if n.target == "clone"]
    assert [written_in_place(n) for n in clones] == [True, True, True, False]
    eliminate_dead_code(seen["gm"].graph)
    assert any(n.kwargs.get("out") is not None for n in seen["gm"].graph.nodes), "an out= write is kept"
