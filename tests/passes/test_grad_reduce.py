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
def test_every_parameter_goes_through_mean_grad_and_the_embedding_gathers_its_tokens(tied):
    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2)
    if tied:  # Llama-3.2-1B's case: lm_head reads the embedding table (one placeholder, two uses)
        model.lm_head.weight = model.model.embed_tokens.weight
    [(gm, plan, inputs)] = capture(model, input_ids=_ids(), labels=_ids(), use_cache=False, world=2,
                                   overlap_grad_reduce=True)
    means = nodes_calling(gm, collectives.mean_grad)
    [gathered] = nodes_calling(gm, collectives.embedding_gathered_grad)
    assert not [n for n in gm.graph.nodes if n.target is torch.nn.functional.embedding]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    table = model.model.embed_tokens.weight
    assert inputs[placeholders.index(gathered.args[1])] is table  # the table itself, not through a mean
    sp_group, grad_group = gathered.args[3], plan_group(gm)
    assert gathered.args[4:6] == (2, 1)  # world, the ids' sequence dim
    # every rank's ids: the whole input_ids, padded as the cut pads them (no gather in the forward)
    whole = gathered.args[6]
    assert whole.target is collectives.pad_to_shards and whole.args[0] is gathered.args[0].args[0]
    assert whole.args[0].op == "placeholder" and not nodes_calling(gm, collectives.gather_seq)
    # the token gradients travel on the sequence-parallel group, the all-reduces on their own
    assert grad_group != sp_group
    assert sp_group == [n for n in gm.graph.nodes if "seq_to_head" in str(n.target)][0].args[1]
    read = {id(inputs[placeholders.index(m.args[0])]) for m in means}
    others = {id(p) for p in model.parameters() if p is not table}
    assert read == (others | {id(table)} if tied else others)  # tied: lm_head's use is averaged
    for m in means:  # the parameter is read through its mean_grad alone (and the gathered embedding)
        assert [u for u in m.args[0].users if u is not gathered] == [m]
        assert m.args[1:] == (grad_group, 2)
    assert any("grad_reduce: " in n and f"{len(means)} parameter gradients" in n and "their own communicator" in n
               and "gathered token gradients" in n for n in plan.notes)


def test_a_batch_with_as_many_tokens_as_the_table_has_rows_all_reduces_the_table():
    model = tiny_llama(layers=1, hidden=64, heads=4, kv_heads=2)  # 128 rows
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))  # 128 tokens
    [(gm, _, inputs)] = capture(model, input_ids=ids, labels=ids, use_cache=False, world=2, overlap_grad_reduce=True)
    assert not nodes_calling(gm, collectives.embedding_gathered_grad)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    read = {id(inputs[placeholders.index(m.args[0])]) for m in nodes_calling(gm, collectives.mean_grad)}
    assert read == {id(p) for p in model.parameters()}


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


def test_a_backend_without_an_average_all_reduce_sums_and_divides():
    import torch.distributed as dist

    with fake_group(2):  # NCCL averages in the collective; gloo and the fake backend cannot
        assert not collectives._averages(dist.group.WORLD.group_name, "cpu")


def test_the_backend_for_a_device_in_a_group_of_one_backend_a_device():
    assert collectives.backend_for("nccl", "cuda") == "nccl"
    assert collectives.backend_for("gloo", "cpu") == "gloo"
    assert collectives.backend_for("cpu:gloo,cuda:nccl", "cuda") == "nccl"  # init_process_group("cpu:gloo,cuda:nccl")
    assert collectives.backend_for("cpu:gloo,cuda:nccl", "cpu") == "gloo"  # CPU gradients: a sum and / P
    assert collectives.backend_for("cuda:nccl", "cpu") is None
