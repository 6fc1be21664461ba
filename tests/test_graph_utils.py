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
    # in-place activations (nn.ReLU(inplace=True) under Dynamo), by keyword or by position
    assert writes_in_place(g.call_function(torch.nn.functional.relu, (x,), {"inplace": True}))
    assert writes_in_place(g.call_function(torch.nn.functional.dropout, (x, 0.1, True, True)))
    assert not writes_in_place(g.call_function(torch.nn.functional.relu, (x,), {"inplace": False}))
    assert not writes_in_place(g.call_function(torch.nn.functional.dropout, (x, 0.1, True)))


class _InPlaceActivation(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.act = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        y = x * 2
        self.act(y)  # result unused; y is
        return y + 1


def _foreach_alias_write(x):
    a = x.clone()
    torch._foreach_mul_([a.long()], -1)  # int64: .long() is a itself, in a list
    return a + 1


def test_found_by_review_in_place_activations_and_foreach_aliases():
    """An in-place activation whose result is unused survives dead-code elimination; a
    ``_foreach_*_`` write into an alias (in a list) is a write into the storage."""
    seen = {}

    def backend(gm, example_inputs):
        seen["gm"] = gm
        return gm.forward

    torch._dynamo.reset()
    model = _InPlaceActivation()
    torch.compile(model, backend=backend)(torch.randn(8))
    gm = seen["gm"]
    eliminate_dead_code(gm.graph)
    gm.recompile()
    x = torch.randn(8)
    torch.testing.assert_close(gm(x)[0] if isinstance(gm(x), tuple) else gm(x), model(x))
    torch._dynamo.reset()
    torch.compile(_foreach_alias_write, backend=backend)(torch.arange(4))
    [clone] = [n for n in seen["gm"].graph.nodes if n.target == "clone"]
    assert written_in_place(clone)


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
