"""defer_weight_grads: weight-gradient matmuls moved between a backward collective and its wait;
what the collective waits for never moves; the held-memory bound and the cover estimate. Whole
backward graphs: tests/distributed (parity with the pass on, every SP > 1 run)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from autosp.passes import defer_weight_grads as dwg
from tests.harness_fake import fake_group

A2A = torch.ops._c10d_functional.all_to_all_single.default
ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
WAIT = torch.ops._c10d_functional.wait_tensor.default
MM, T, RELU, DIV = torch.ops.aten.mm.default, torch.ops.aten.t.default, torch.ops.aten.relu.default, torch.ops.aten.div.Tensor


def _node(g, target, args, value):
    n = g.call_function(target, args)
    n.meta["val"] = value
    return n


def _layer_backward(*, grad_reduce: bool, rows: int = 32):
    """An o_proj backward as autograd leaves it: the input gradient all-to-all'd and waited for at
    once, the two weight gradients (o_proj's, ``[rows, 32]``, and an MLP's) made before it."""
    g = fx.Graph()
    vals = dict(x=torch.randn(64, 32), w=torch.randn(rows, 32), g_in=torch.randn(64, rows), h=torch.randn(64, 48))
    x, w, g_in, h = (g.placeholder(k) for k in vals)
    for node, v in zip((x, w, g_in, h), vals.values(), strict=True):
        node.meta["val"] = v
    dy = _node(g, RELU, (g_in,), torch.relu(vals["g_in"]))            # computed in the backward
    dw_mlp = _node(g, MM, (_node(g, T, (h,), vals["h"].t()), g_in), vals["h"].t() @ vals["g_in"])  # reads inputs alone
    dx = _node(g, MM, (dy, w), dy.meta["val"] @ vals["w"])              # what the all-to-all sends
    dw = _node(g, MM, (_node(g, T, (dy,), dy.meta["val"].t()), x), dy.meta["val"].t() @ vals["x"])
    dw_t = _node(g, T, (dw,), dw.meta["val"].t())
    outs = [dw_t, dw_mlp]
    if grad_reduce:
        r = _node(g, ALL_REDUCE, (dw_t, "sum", "0"), dw_t.meta["val"])
        outs[0] = _node(g, DIV, (_node(g, WAIT, (r,), dw_t.meta["val"]), 2), dw_t.meta["val"] / 2)
    c = _node(g, A2A, (dx, [32, 32], [32, 32], "0"), dx.meta["val"])
    z = _node(g, RELU, (_node(g, WAIT, (c,), dx.meta["val"]),), dx.meta["val"])
    g.output((z, *outs))
    return fx.GraphModule(torch.nn.Module(), g), dict(dx=dx, dw=dw, dw_mlp=dw_mlp, c=c)


@pytest.mark.parametrize("grad_reduce", [False, True])
def test_weight_gradients_fill_the_wait_and_the_sent_gradient_stays_ahead(grad_reduce):
    gm, n = _layer_backward(grad_reduce=grad_reduce)
    inputs = [torch.randn(64, 32), torch.randn(32, 32), torch.randn(64, 32), torch.randn(64, 48)]
    with fake_group(2):  # values that did not cross ranks: the weight gradients
        before = gm(*inputs)[1:]
    assert dwg.defer_weight_grads_pass(gm) == (2, 1, 0)
    order = list(gm.graph.nodes)
    pos = order.index
    wait = next(u for u in n["c"].users)
    assert pos(n["dx"]) < pos(n["c"])  # what the collective sends is never moved past it
    assert pos(n["c"]) < pos(n["dw"]) < pos(wait) and pos(n["c"]) < pos(n["dw_mlp"]) < pos(wait)
    assert pos(n["dw"]) < pos(n["dw_mlp"])  # the latest first (the shortest lifetime stretched)
    if grad_reduce:  # the gradient's all-reduce goes after the wait (not beside the all-to-all)
        [r] = [m for m in order if m.target is ALL_REDUCE]
        assert pos(wait) < pos(r) < pos(next(iter(r.users)))
    gm.graph.lint()
    with fake_group(2):
        after = gm(*inputs)[1:]
    for a, b in zip(after, before, strict=True):
        assert torch.equal(a, b)


def test_a_long_first_matmul_is_split_into_a_short_head(monkeypatch):
    """NCCL's kernel starts on the device when the kernel running beside it frees SMs (2x H200,
    2026-11-30 trace: in a window opened by a 0.40 ms matmul the all-to-all started 0.33 ms in,
    in one opened by a 0.09 ms matmul, as it ended): a window's first matmul longer than
    4 x ``HEAD_S`` is split by output rows, exactly, into a head and the rest."""
    gm, n = _layer_backward(grad_reduce=False, rows=256)
    inputs = [torch.randn(64, 32), torch.randn(256, 32), torch.randn(64, 256), torch.randn(64, 48)]
    with fake_group(2):
        before = gm(*inputs)[1:]
    monkeypatch.setattr(dwg, "GEMM_FLOPS_PER_S", 1e6)  # dw (256 x 32 x 64) 1.05 s, dw_mlp (48 x 256 x 64) 1.57 s
    monkeypatch.setattr(dwg, "COVER", 1e12)  # both taken, dw (the latest) first
    monkeypatch.setattr(dwg, "HEAD_S", 0.2)  # dw: 64 rows of 256 first
    assert dwg.defer_weight_grads_pass(gm) == (2, 1, 1)
    order = list(gm.graph.nodes)
    window = order[order.index(n["c"]) + 1:]
    mms = [m for m in window if m.target is MM]
    assert [tuple(m.meta["val"].shape) for m in mms] == [(64, 32), (192, 32), (48, 256)]  # dw's head, its rest, dw_mlp
    assert window[1] is mms[0] and window[0] is mms[0].args[0]  # the head (after its rows' view) opens the window
    assert window.index(mms[2]) < window.index(next(iter(n["c"].users)))  # all before the wait
    gm.graph.lint()
    with fake_group(2):
        after = gm(*inputs)[1:]
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b)

    gm, n = _layer_backward(grad_reduce=False, rows=256)
    monkeypatch.setattr(dwg, "HEAD_S", 0.3)  # dw: not longer than 4 x HEAD_S: whole
    assert dwg.defer_weight_grads_pass(gm) == (2, 1, 0)


def test_a_window_takes_only_what_covers_it(monkeypatch):
    monkeypatch.setattr(dwg, "COVER", 1e-9)
    gm, n = _layer_backward(grad_reduce=False)
    assert dwg.defer_weight_grads_pass(gm) == (1, 1, 0)
    order = list(gm.graph.nodes)
    assert order.index(n["dw"]) > order.index(n["c"]) > order.index(n["dw_mlp"])  # the latest alone


def test_nothing_moves_past_the_held_memory_bound(monkeypatch):
    monkeypatch.setattr(dwg, "HELD_BYTES", 64 * 32 * 4 - 1)  # below dy's bytes, which moving dw holds longer
    gm, n = _layer_backward(grad_reduce=False)
    moved, _, _ = dwg.defer_weight_grads_pass(gm)
    order = list(gm.graph.nodes)
    assert order.index(n["dw"]) < order.index(n["c"])  # dy would live longer: stays
    assert moved == 1 and order.index(n["dw_mlp"]) > order.index(n["c"])  # h is a graph input: nothing held


def test_gradient_all_reduces_are_no_windows():
    gm, _ = _layer_backward(grad_reduce=True)
    g = gm.graph
    c = next(m for m in g.nodes if m.target is A2A)
    wait = next(iter(c.users))
    wait.replace_all_uses_with(c.args[0])  # the all-to-all now unread: only the all-reduce is waited on
    g.erase_node(wait)
    g.erase_node(c)
    gm.recompile()
    assert dwg.defer_weight_grads_pass(gm) == (0, 0, 0)


def test_a_wait_on_what_is_no_collective_is_no_window(monkeypatch):
    """A second wait on a gathered tensor's view (the embedding's token gradients) waits for nothing."""
    monkeypatch.setattr(dwg, "COVER", 1e-9)  # the all-to-all's window takes dw alone: dw_mlp is left
    gm, n = _layer_backward(grad_reduce=False)
    g = gm.graph
    wait = next(iter(n["c"].users))
    relu = next(iter(wait.users))
    with g.inserting_after(relu):
        again = _node(g, WAIT, (relu,), wait.meta["val"])  # wait(relu(...)), read by nothing
    gm.recompile()
    assert dwg.defer_weight_grads_pass(gm) == (1, 1, 0)  # the all-to-all's window alone, not the relu's wait
    order = list(g.nodes)
    assert order.index(n["dw_mlp"]) < order.index(n["c"]) < order.index(n["dw"]) < order.index(wait)
    assert again in order


def test_a_gradient_waited_before_the_window_ends_is_not_moved_into_it():
    """A window whose wait lies after a gradient's wait (a wait sunk to the graph's end after the
    gradient waits): the gradient's all-reduce, put after the window's wait, would follow its own."""
    gm, n = _layer_backward(grad_reduce=True)
    g = gm.graph
    c_wait = next(iter(n["c"].users))
    [r] = [m for m in g.nodes if m.target is ALL_REDUCE]
    r_wait = next(iter(r.users))
    output = next(m for m in g.nodes if m.op == "output")
    for m in (r_wait, *r_wait.users):  # the gradient's wait and its / 2, then the window's wait and after
        output.prepend(m)
    for m in (c_wait, *c_wait.users):
        output.prepend(m)
    gm.recompile()
    assert dwg.defer_weight_grads_pass(gm) == (1, 1, 0)  # dw_mlp alone: dw's all-reduce is waited first
    g.lint()
    order = list(g.nodes)
    assert order.index(n["dw"]) < order.index(n["c"]) < order.index(n["dw_mlp"])


def test_a_compiled_backward_fills_its_all_to_all_waits_and_the_plan_says_so(tmp_path):
    import re

    import autosp
    from tests.passes.models_tiny import tiny_llama

    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with fake_group(2):  # structure only: the fake group moves no data
        model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2)
        compiled = torch.compile(model, backend=autosp.backend(compiler="aot_eager", logits="drop", check_plan=False,
                                                               dump_dir=str(tmp_path)))
        compiled(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    [text] = [p.read_text() for p in tmp_path.glob("*.txt")]
    moved = re.search(r"defer_weight_grads: (\d+) weight-gradient matmuls moved into the waits of (\d+)", text)
    assert moved and int(moved.group(1)) > 0 and int(moved.group(2)) > 0, text
