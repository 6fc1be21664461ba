"""Each wrapper of a private torch API works on this torch (autosp/_torch_private.py names them all)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from autosp import _torch_private as tp


def _seen_by_a_backend(fn, *args, dynamic):
    """What a Dynamo backend sees while compiling ``fn(*args)``: placeholder values, fake mode, compile id."""
    seen = {}

    def backend(gm, example_inputs):
        seen["vals"] = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        seen["mode"] = tp.fake_mode_of(seen["vals"])
        seen["id"] = tp.compile_id()
        return gm.forward

    torch.compile(fn, backend=backend, dynamic=dynamic)(*args)
    return seen


def test_size_hint_and_same_size_on_ints():
    assert tp.size_hint(7) == 7
    assert tp.same_size(4, 4) and not tp.same_size(4, 5)
    assert not tp.is_symbolic(3) and not tp.is_symbolic(torch.tensor(3))


def test_size_hint_and_same_size_on_symints():
    seen = _seen_by_a_backend(lambda x: x * 2, torch.randn(5, 3), dynamic=True)
    [x] = [v for v in seen["vals"] if isinstance(v, torch.Tensor)]
    s0, s1 = x.shape
    assert tp.is_symbolic(s0) and tp.is_symbolic(s1)
    assert (tp.size_hint(s0), tp.size_hint(s1)) == (5, 3)
    assert tp.same_size(s0, s0) and tp.same_size(s0, x.shape[0])
    assert not tp.same_size(s0, s1) and not tp.same_size(s0, 5) and not tp.same_size(5, s0)


def test_fake_mode_of():
    seen = _seen_by_a_backend(lambda x: x + 1, torch.randn(2, 3), dynamic=False)
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert isinstance(seen["mode"], FakeTensorMode)
    assert seen["mode"] is seen["vals"][0].fake_mode
    assert tp.fake_mode_of([1, None, torch.randn(2)]) is None


def test_compile_id():
    seen = _seen_by_a_backend(lambda x: x - 1, torch.randn(2), dynamic=False)
    assert seen["id"] == "0/0"  # first frame, first compile (the Dynamo cache is fresh)
    assert re.fullmatch(r"\d+/\d+", seen["id"])
    assert tp.compile_id() == "-"  # outside a compile


def test_lookup_backend():
    aot_eager = tp.lookup_backend("aot_eager")
    assert callable(aot_eager)
    f = torch.compile(lambda x: x.sin() * 2, backend=aot_eager)
    x = torch.randn(4)
    torch.testing.assert_close(f(x), x.sin() * 2)
    with pytest.raises(Exception, match="no_such_backend"):
        tp.lookup_backend("no_such_backend")


def test_functional_collectives():
    fc = tp.functional_collectives()
    for name in ("all_to_all_single_autograd", "all_gather_tensor_autograd", "wait_tensor"):
        assert callable(getattr(fc, name)), name


def test_fake_process_group_init_resolve_and_destroy():
    assert not dist.is_initialized()
    tp.init_fake_process_group(1, 4)
    try:
        assert dist.is_initialized()
        assert (dist.get_world_size(), dist.get_rank()) == (4, 1)
        group = tp.resolve_group(dist.group.WORLD.group_name)
        assert group.size() == 4
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_partitioned_hooks_see_forward_and_backward(compiler):
    seen = []

    def forward_hook(gm, inputs):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        seen.append(("fw", tp.num_forward_returns(), len(outputs)))
        return inputs

    def backward_hook(gm, inputs):
        seen.append(("bw", len(inputs)))
        return inputs

    def backend(gm, inputs):
        return tp.compile_partitioned(gm, inputs, compiler, forward_hook, backward_hook)

    f = torch.compile(lambda x: (x.sin() * x).cos(), backend=backend)
    x = torch.randn(8, requires_grad=True)
    f(x).sum().backward()
    torch.testing.assert_close(x.grad, (-(x.sin() * x).sin() * (x.cos() * x + x.sin())).detach())
    (_, returns, n_out), (_, n_bw_in) = seen
    assert returns == 1 and n_out > returns  # one user output, then what is saved for the backward
    assert n_bw_in == n_out - returns + 1  # the saved values and one incoming gradient
    assert tp.num_forward_returns() is None  # outside a compile
    with pytest.raises(ValueError, match="does not partition"):
        tp.compile_partitioned(None, [], "eager", forward_hook, backward_hook)
