"""Tier 2: a training loop over several steps compiles once and keeps matching one device.

The speed issue asks for no recompilation after the first step; this checks it on 2 gloo
processes with every memory pass on (fused loss, selective recompute), an AdamW step in
between, against the same loop on one process.
"""

from __future__ import annotations

import copy

import torch

from tests.distributed.harness import run_group

STEPS = 3


def _train(rank: int, world: int) -> dict:
    import autosp
    from tests.distributed.models import VOCAB, build

    torch._dynamo.reset()
    model = build("llama")
    ref = copy.deepcopy(model)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, ref)]
    compiled = torch.compile(model, backend=autosp.backend(compiler="aot_eager", outputs="full",
                                                           recompute="selective", logits="drop"))
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(3))
    graphs, losses = [], []
    for _ in range(STEPS):
        pair = []
        for m, opt in ((compiled, opts[0]), (ref, opts[1])):
            loss = m(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            if m is compiled:
                autosp.reduce_gradients(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            pair.append(loss.item())
        losses.append(pair)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return {"graphs": graphs, "losses": losses}


def test_three_steps_compile_once_and_match_one_device():
    for r in run_group(2, _train, timeout=600):
        assert r["graphs"][0] >= 1 and r["graphs"] == [r["graphs"][0]] * STEPS, r["graphs"]
        for got, want in r["losses"]:
            assert abs(got - want) <= 1e-4 * abs(want), r["losses"]
        assert r["losses"][0][0] != r["losses"][-1][0]  # the optimizer moved the weights


def _backward_work(rank: int, world: int, mode: str) -> tuple:
    """All-to-alls and attention forwards the backward runs, and the first layer's q gradient."""
    from torch.profiler import profile

    import autosp
    from tests.distributed.models import VOCAB, build

    torch._dynamo.reset()
    model = build("llama")
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend=autosp.backend(compiler="aot_eager", recompute=mode, logits="drop"))
    loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
    with profile() as prof:
        loss.backward()
    autosp.reduce_gradients(model)
    events = prof.key_averages()
    a2a = sum(e.count for e in events if e.key == "_c10d_functional::all_to_all_single")
    attn = sum(e.count for e in events if e.key.startswith("aten::_scaled_dot_product") and "backward" not in e.key)
    return a2a, attn, model.model.layers[0].self_attn.q_proj.weight.grad.tolist()  # no tensors across processes


def test_full_recompute_reruns_attention_and_all_to_alls_selective_does_not():
    runs = {mode: run_group(2, _backward_work, mode, timeout=600)[0] for mode in ("selective", "full")}
    layers = 2
    # Per layer, q, k and v cross in one all-to-all and the output in another.
    assert runs["selective"][:2] == (2 * layers, 0)  # the backward's own all-to-alls only
    assert runs["full"][:2] == (4 * layers, layers)  # plus the forward's, and attention again
    torch.testing.assert_close(torch.tensor(runs["full"][2]), torch.tensor(runs["selective"][2]), rtol=1e-5, atol=1e-7)
