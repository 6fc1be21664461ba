"""sum_products: a sum of matmul products becomes an addmm chain; the step is the same."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import autosp
from autosp.graph_utils import live_bytes
from autosp.passes.sum_products import sum_products_pass
from tests.passes.models_tiny import tiny_llama


def _targets(gm, op):
    return [n for n in gm.graph.nodes if n.target == op]


def test_three_products_become_one_mm_and_two_addmm_and_hold_less():
    def f(a, b, c, w1, w2, w3):
        return (a @ w1).view(1, 256, 32) + (b @ w2).view(1, 256, 32) + (c @ w3).view(1, 256, 32)

    args = [torch.randn(256, 16) for _ in range(3)] + [torch.randn(16, 32) for _ in range(3)]
    gm = make_fx(f)(*args)
    before = max(live_bytes(gm.graph))
    assert sum_products_pass(gm) == 1
    assert len(_targets(gm, torch.ops.aten.mm.default)) == 1
    assert len(_targets(gm, torch.ops.aten.addmm.default)) == 2
    assert not _targets(gm, torch.ops.aten.add.Tensor)
    # In this graph's order the first sum's output, its two products and the inputs were alive at
    # once; now the accumulator, the next product's output and the inputs (as estimated).
    product = 256 * 32 * 4
    assert max(live_bytes(gm.graph)) <= before - product / 4
    torch.testing.assert_close(gm(*args), f(*args), rtol=1e-6, atol=1e-6)


def test_sums_it_cannot_chain_are_left_alone():
    def f(a, b, w1, w2, x):
        p = a @ w1
        twice = (b @ w1).view(64)
        return (p + b @ w2, p.sum(), (a @ w1) + x, (a @ w1) + (a[:, :8] @ w2[:8, :8]).sum(-1, keepdim=True),
                twice + twice)

    args = (torch.randn(8, 8), torch.randn(8, 8), torch.randn(8, 8), torch.randn(8, 8), torch.randn(8, 8))
    gm = make_fx(f)(*args)
    # a product read elsewhere too; a term that is no product; products of other shapes; a
    # product added to itself
    assert sum_products_pass(gm) == 0
    torch.testing.assert_close(gm(*args), f(*args))


@pytest.mark.parametrize("recompute", ["attention_out", "blocks"])
def test_the_projections_input_gradients_are_chained_and_the_step_is_the_same(graphs, recompute):
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(2))
    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2)

    def step(**options):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=autosp.backend(logits="drop", compiler="aot_eager",
                                                               recompute=recompute, **options))
        out = compiled(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return out.loss.detach(), grads

    loss0, grads0 = step(disable_passes=("sum_products",))
    before = len(_targets(graphs["bw"], torch.ops.aten.mm.default))
    loss1, grads1 = step()
    after = graphs["bw"]
    # per layer: q, k, v (two addmm) and the MLP's gate and up (one)
    assert len(_targets(after, torch.ops.aten.addmm.default)) == 2 * (2 + 1)
    assert len(_targets(after, torch.ops.aten.mm.default)) == before - 2 * (2 + 1)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_disable_by_name():
    autosp.Config(disable_passes=("sum_products",))
