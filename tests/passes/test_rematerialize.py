"""rematerialize: a cheap value held through an attention backward is computed again after it."""

from __future__ import annotations

import pytest
import torch

import autosp
from autosp.graph_utils import live_bytes
from autosp.passes.rematerialize import rematerialize_pass
from tests.passes.models_tiny import tiny_llama


def _step(model, ids, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=autosp.backend(logits="drop", compiler="aot_eager", **options))
    out = compiled(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def _attention_backward(node) -> bool:
    return "attention" in str(node.target) and "backward" in str(node.target)


@pytest.mark.parametrize("recompute", ["full", "blocks", "selective"])
def test_the_norm_is_made_again_after_attention_and_the_step_is_exact(graphs, recompute):
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2)
    loss0, grads0 = _step(model, ids, recompute=recompute, disable_passes=("rematerialize", "sum_products"))
    assert not graphs  # off, nothing needs the partitioned graphs: torch's own path
    loss1, grads1 = _step(model, ids, recompute=recompute, disable_passes=("sum_products",))
    assert torch.equal(loss0, loss1)
    for name, g in grads0.items():  # the same ops on the same values
        torch.testing.assert_close(grads1[name], g, rtol=0, atol=0, msg=name)
    before, after = graphs["bw_before"].graph, graphs["bw"].graph
    assert len(after.nodes) > len(before.nodes)
    # The [S, hidden] values made before an attention backward and read after it: the norm's
    # (x * rsqrt, and its product with the weight) no longer; the residual stream's gradient
    # (not made from values alive there) still.
    crossing = {}
    for name, g in (("before", before), ("after", after)):
        nodes = list(g.nodes)
        attention = [i for i, n in enumerate(nodes) if _attention_backward(n)]
        assert attention
        crossing[name] = set()
        for i, n in enumerate(nodes):
            v = n.meta.get("val")
            if n.op != "call_function" or not isinstance(v, torch.Tensor) or v.shape[-2:] != (96, 64) or v._is_view():
                continue
            uses = [nodes.index(u) for u in n.users]
            if any(i < a < max(uses, default=-1) for a in attention):
                crossing[name].add(n.name)
    gone = crossing["before"] - crossing["after"]
    assert crossing["after"] < crossing["before"] and len(gone) >= 2, crossing
    assert all(name.startswith(("mul", "view")) for name in gone) and any(n.startswith("mul") for n in gone), gone


def test_only_cheap_values_are_made_again():
    """Both values are read before and after an attention backward: the pointwise one is made
    again from the graph input, the matmul's is held."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, w, q, g, lse):
        h = torch.mm(x, w)
        n = x * 2
        early = h.sum() + n.sum()
        dq = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
            g, q, q, q, q, lse, 0.0, True)[0]
        return early, h * 3 + n * 5, dq

    args = (torch.randn(64, 64), torch.randn(64, 64), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4),
            torch.zeros(1, 1, 8))
    gm = make_fx(f)(*args)
    expected = f(*args)
    [again] = rematerialize_pass(gm)
    made = [n for n in gm.graph.nodes if n.target == torch.ops.aten.mul.Tensor and n.args[1] == 2]
    assert again == made[0].name and len(made) == 2  # x * 2, twice
    assert len([n for n in gm.graph.nodes if n.target == torch.ops.aten.mm.default]) == 1
    for got, want in zip(gm(*args), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_values_held_through_long_compute_are_made_again(monkeypatch):
    """No attention backward between the uses, but a long stretch of matmuls (a layer's MLP
    backward): the cheap value is made again after it when the stretch is long enough."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from autosp.passes import rematerialize

    def f(x, w, q, g, lse):
        n = x * 2
        early = n.sum()
        late = torch.mm(torch.mm(x, w), w) + n  # the stretch, then the late use
        dq = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
            g, q, q, q, q, lse, 0.0, True)[0]  # after the late use: not between the uses
        return early, late, dq

    args = (torch.randn(64, 64), torch.randn(64, 64), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4),
            torch.zeros(1, 1, 8))
    expected = f(*args)
    monkeypatch.setattr(rematerialize, "MIN_STRETCH_S", 1.0)  # two 64^3 matmuls: far less
    assert rematerialize_pass(make_fx(f)(*args)) == []
    monkeypatch.setattr(rematerialize, "MIN_STRETCH_S", 1e-12)
    monkeypatch.setattr(rematerialize, "LONG_STRETCH", 1e-3)  # at these sizes a memory pass outweighs the matmuls
    gm = make_fx(f)(*args)
    [again] = rematerialize_pass(gm)
    assert len([n for n in gm.graph.nodes if n.target == torch.ops.aten.mul.Tensor and n.args[1] == 2]) == 2
    for got, want in zip(gm(*args), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_live_bytes_through_the_attention_backward_drop(graphs):
    """What the backward graph holds while attention's backward runs, by graph_utils.live_bytes."""
    ids = torch.randint(0, 128, (1, 128), generator=torch.Generator().manual_seed(1))
    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2)
    _step(model, ids, recompute="blocks")

    def at_attention(g):
        nodes = list(g.nodes)
        live = live_bytes(g)
        return [live[i] for i, n in enumerate(nodes) if _attention_backward(n)]

    before, after = at_attention(graphs["bw_before"].graph), at_attention(graphs["bw"].graph)
    assert len(before) == len(after) == 2
    norm = 128 * 64 * 2  # one [S, hidden] float32 value at least moved out (the norm's x * rsqrt)
    assert all(a <= b - norm for a, b in zip(after, before, strict=True)), (before, after)


def test_disable_by_name():
    autosp.Config(disable_passes=("rematerialize",))
    with pytest.raises(ValueError, match="rematerialize"):
        autosp.Config(disable_passes=("rematerialise",))


def test_through_a_matmul_across_long_compute_only(monkeypatch):
    """A value made by a matmul and read before and after a long stretch is made again through
    the matmul when the stretch pays for it (``COSTLY_SHARE``), never across an attention
    backward alone, and the result is exact."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from autosp.passes import rematerialize

    def f(x, w, v):
        h = torch.mm(x, w)  # read early and late
        early = h.sum()
        stretch = torch.mm(torch.mm(torch.mm(v, v), v), v)  # three 64^3 matmuls: the stretch
        return early, stretch, h * 3

    args = (torch.randn(64, 16), torch.randn(16, 64), torch.randn(64, 64))
    expected = f(*args)
    monkeypatch.setattr(rematerialize, "MIN_STRETCH_S", 1e-12)
    monkeypatch.setattr(rematerialize, "LONG_STRETCH", 1e-3)
    # The attention backward the pass looks for first: none here, so nothing at all to do.
    assert rematerialize_pass(make_fx(f)(*args)) == []

    def g(x, w, v, q, grad, lse):
        early, stretch, late = f(x, w, v)
        dq = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
            grad, q, q, q, q, lse, 0.0, True)[0]
        return early, stretch, late, dq

    more = (torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), torch.zeros(1, 1, 8))
    expected = g(*args, *more)
    # h's matmul (64 x 16 x 64) against the stretch (3 x 64^3): 1/12 of it; allowed up to 1/4.
    gm = make_fx(g)(*args, *more)
    assert rematerialize_pass(gm) == ["mm"]
    assert len([n for n in gm.graph.nodes if n.target == torch.ops.aten.mm.default]) == 5  # h's, made twice
    for got, want in zip(gm(*args, *more), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    monkeypatch.setattr(rematerialize, "COSTLY_SHARE", 32)  # now the matmul costs too much
    assert rematerialize_pass(make_fx(g)(*args, *more)) == []


def _all_to_alls(graph) -> int:
    return sum(1 for n in graph.nodes if "all_to_all" in str(n.target))


def _remat_worker(rank, world, recompute, more):
    """One step with and without rematerialize (its thresholds lowered to these sizes) on each
    rank of the group: (losses and gradients equal, all-to-alls in both backward graphs)."""
    from autosp import _torch_private
    from autosp.passes import rematerialize
    from tests.passes.conftest import partitioned_spy

    rematerialize.MIN_STRETCH_S = 0.0
    rematerialize.LONG_STRETCH = 0.0
    rematerialize.COSTLY_SHARE = 1e-9  # the tiny model's stretches are short against its all-to-alls
    seen = {}
    _torch_private.compile_partitioned = partitioned_spy(seen)  # no fixture in a spawned rank
    ids = torch.randint(0, 128, (1, 38), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128)
    out = {}
    for name, off in (("off", ("rematerialize", "sum_products")), ("on", ("sum_products",))):
        loss, grads = _step(model, ids, recompute=recompute, tile_mlp=2, offload=True, disable_passes=off, **more)
        out[name] = (loss, grads, _all_to_alls(seen["bw"].graph))
    same = torch.equal(out["off"][0], out["on"][0]) and all(
        torch.equal(out["off"][1][k], out["on"][1][k]) for k in out["off"][1])
    return same, out["off"][2], out["on"][2]


@pytest.mark.parametrize("recompute,more", [("attention_out", {}), ("full", {}), ("full", {"attention_head_groups": 2})])
def test_all_to_alls_made_again_across_the_mlp_backward_exactly_on_2_ranks(recompute, more):
    """Over gloo, 2 ranks: with the long-stretch rule allowed through collectives, the backward
    issues the all-to-alls of ``o_proj``'s input (and with ``full`` of q, k, v) again after the
    MLP's backward, each once, and the step is bitwise the same."""
    from tests.distributed.harness import run_group

    # One more per layer for o_proj's input; with "full" one more for q, k and v together (their
    # shared all-to-all made once, also with head groups): 2 layers.
    extra = {"attention_out": 1, "full": 2}[recompute] * 2
    for same, before, after in run_group(2, _remat_worker, recompute, more, timeout=600):
        assert same
        assert after == before + extra, (before, after)


def test_no_matmul_made_again_across_attention(monkeypatch):
    """A stretch with an attention call in it never pays for matmuls or collectives: the budget
    would be a share of attention's own time."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from autosp.passes import rematerialize

    def f(x, w, q, grad, lse):
        h = torch.mm(x, w)
        early = h.sum()
        dq = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
            grad, q, q, q, q, lse, 0.0, True)[0]
        return early, dq, h * 3

    args = (torch.randn(64, 16), torch.randn(16, 64), torch.randn(1, 1, 256, 64), torch.randn(1, 1, 256, 64),
            torch.zeros(1, 1, 256))
    monkeypatch.setattr(rematerialize, "MIN_STRETCH_S", 1e-12)
    monkeypatch.setattr(rematerialize, "LONG_STRETCH", 1e-3)
    assert rematerialize_pass(make_fx(f)(*args)) == []


def test_a_view_of_an_offloaded_input_is_taken_again_where_it_is_reloaded():
    """An offloaded input is reloaded where it is read: a value made again from a view of it
    reads a view made there, not the early view (which would hold the early reload through the
    attention backward)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(p, q, grad, lse):
        n = p.view(64, 64) * 2
        early = n.sum()
        dq = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
            grad, q, q, q, q, lse, 0.0, True)[0]
        return early, dq, n * 3 + p.view(64, 64).t()

    args = (torch.randn(4096), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), torch.zeros(1, 1, 8))
    gm = make_fx(f)(*args)
    p = next(n for n in gm.graph.nodes if n.op == "placeholder")
    expected = f(*args)
    assert rematerialize_pass(gm, offloaded=frozenset({p.name})) != []
    nodes = list(gm.graph.nodes)
    attention = next(i for i, n in enumerate(nodes) if _attention_backward(n))
    late_muls = [n for n in nodes[attention:] if n.target == torch.ops.aten.mul.Tensor and n.args[1] == 2]
    assert late_muls, gm.graph
    view = late_muls[0].args[0]
    assert nodes.index(view) > attention, "reads the view made before the attention backward"
    for got, want in zip(gm(*args), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
