"""param_ready: each parameter waits for a collective in flight into it right before its first
reader (after grad_reduce's mean_grad views), so a layer waits for its own block alone. Values
across ranks, with the gathers really in flight: tests/distributed/test_sharded_optimizer_gloo.py."""

from __future__ import annotations

import torch

from autosp import collectives
from tests.harness_fake import capture, nodes_calling
from tests.passes.models_tiny import tiny_llama


def _ids():
    return torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(0))


def _regions(world, **options):
    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2)
    return model, capture(model, input_ids=_ids(), labels=_ids(), use_cache=False, world=world, **options)


def test_each_parameter_waits_right_before_its_first_reader():
    model, [(gm, plan, inputs)] = _regions(2, overlap_grad_reduce=True)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = {id(p) for p in model.parameters()}
    readies = nodes_calling(gm, collectives.param_ready)
    waited = {id(inputs[placeholders.index(r.args[0])]) for r in readies}
    assert waited == params and len(readies) == len(params)  # each parameter once
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for r in readies:
        assert list(r.args[0].users) == [r]  # the parameter is read through its wait alone
        readers = [u for u in r.users if u.target is not collectives.mean_grad]
        readers += [v for u in r.users if u.target is collectives.mean_grad for v in u.users]
        first = min(order[u] for u in readers)
        between = [n for n in gm.graph.nodes if order[r] < order[n] < first]
        assert all(n.target is collectives.mean_grad for n in between), between  # nothing else before it
    # the last layer's weights wait after the first layer's attention, not at the top of the graph
    attention = [n for n in gm.graph.nodes if "seq_to_head" in str(n.target)]
    last_layer = model.model.layers[-1].self_attn.q_proj.weight
    [wait] = [r for r in readies if inputs[placeholders.index(r.args[0])] is last_layer]
    assert order[wait] > order[attention[0]]
    assert any(n.startswith("param_ready: ") for n in plan.notes)


def test_one_rank_is_left_alone():
    _, [(gm, plan, _)] = _regions(1)
    assert not nodes_calling(gm, collectives.param_ready)
