"""grad_reduce: parameters read through ``mean_grad``; the backward's gradient all-reduces
scheduled for overlap (``sink_grad_waits``). Values across ranks: tests/distributed/test_grad_reduce_gloo.py."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from autosp import collectives
from autosp.passes.grad_reduce import sink_grad_waits
from tests.harness_fake import capture, fake_group, nodes_calling
from tests.passes.models_tiny import tiny_llama

ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
WAIT = torch.ops._c10d_functional.wait_tensor.default


def _ids():
    return torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied", [False, True])
def test_every_parameter_and_nothing_else_goes_through_mean_grad(tied):
    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2)
    if tied:  # Llama-3.2-1B's case: lm_head reads the embedding table (one placeholder, two uses)
        model.lm_head.weight = model.model.embed_tokens.weight
    [(gm, plan, inputs)] = capture(model, input_ids=_ids(), labels=_ids(), use_cache=False, world=2,
                                   overlap_grad_reduce=True)
    means = nodes_calling(gm, collectives.mean_grad)
    params = list(model.parameters())  # a tied table once
    assert len(means) == len(params)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    read = {id(inputs[placeholders.index(m.args[0])]) for m in means}
    assert read == {id(p) for p in params}
    grad_group = plan_group(gm)
    sp_group = [n for n in gm.graph.nodes if "seq_to_head" in str(n.target)][0].args[1]
    assert grad_group != sp_group  # the all-reduces on their own communicator, the all-to-alls on theirs
    for m in means:  # the parameter is read through its mean_grad alone
        assert list(m.args[0].users) == [m]
        assert m.args[1:] == (grad_group, 2)
    assert any("grad_reduce: " in n and f"{len(params)} parameter gradients" in n and "their own communicator" in n
               for n in plan.notes)


def plan_group(gm):
    """The group name the pass wrote (every mean_grad carries the same one)."""
    return nodes_calling(gm, collectives.mean_grad)[0].args[1]


@pytest.mark.parametrize("case", ["option off", "one rank"])
def test_quiet_when_off_or_alone(case):
    model = tiny_llama(layers=1, hidden=64, heads=4, kv_heads=2)
    world, on = (2, False) if case == "option off" else (1, True)
    [(gm, _, _)] = capture(model, input_ids=_ids(), labels=_ids(), use_cache=False, world=world, overlap_grad_reduce=on)
    assert not nodes_calling(gm, collectives.mean_grad)


def _backward_like_graph():
    """What the partitioner hands over: the gradient all-reduces at the end, after all the work."""
    g = fx.Graph()
    x, w1, w2 = (g.placeholder(n) for n in ("x", "w1", "w2"))
    grad1 = g.call_function(torch.mm, (x, w1))                 # layer 2's weight gradient
    h = g.call_function(torch.relu, (grad1,))
    a2a = g.call_function(ALL_REDUCE, (h, "sum", "0"))         # a collective that feeds more work
    h_wait = g.call_function(WAIT, (a2a,))
    grad2 = g.call_function(torch.mm, (h_wait, w2))            # layer 1's weight gradient
    more = g.call_function(torch.tanh, (grad2,))
    r1 = g.call_function(ALL_REDUCE, (grad1, "sum", "0"))
    w_1 = g.call_function(WAIT, (r1,))
    d1 = g.call_function(torch.div, (w_1, 2))
    r2 = g.call_function(ALL_REDUCE, (grad2, "sum", "0"))
    w_2 = g.call_function(WAIT, (r2,))
    d2 = g.call_function(torch.div, (w_2, 2))
    g.output((more, d1, d2))
    return fx.GraphModule(torch.nn.Module(), g), dict(grad1=grad1, r1=r1, grad2=grad2, r2=r2, a2a=a2a, h_wait=h_wait)


def test_collectives_move_up_to_their_input_and_waits_down_to_the_output():
    gm, n = _backward_like_graph()
    assert sink_grad_waits(gm) == 2
    order = [node for node in gm.graph.nodes]
    assert order[order.index(n["grad1"]) + 1] is n["r1"]  # issued as soon as the gradient exists
    assert order[order.index(n["grad2"]) + 1] is n["r2"]
    # the two waits and their / 2 are the last work before the output
    assert [(node.target, node.args[0]) for node in order[-5:-1]] == [
        (WAIT, n["r1"]), (torch.div, order[-5]), (WAIT, n["r2"]), (torch.div, order[-3])]
    assert order.index(n["h_wait"]) == order.index(n["a2a"]) + 1  # a wait that feeds work stays
    gm.graph.lint()
    x, w1, w2 = torch.randn(4, 4), torch.randn(4, 4), torch.randn(4, 4)
    with fake_group(2):  # collectives on a fake group move no data: one rank's values
        more, d1, d2 = gm(x, w1, w2)  # still a valid program, same values
    torch.testing.assert_close(d1, torch.mm(x, w1) / 2)
    torch.testing.assert_close(more, torch.tanh(torch.mm(torch.relu(torch.mm(x, w1)), w2)))


def test_nothing_to_move_in_a_graph_without_gradient_collectives():
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.relu, (x,)))
    gm = fx.GraphModule(torch.nn.Module(), g)
    assert sink_grad_waits(gm) == 0
