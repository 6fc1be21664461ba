"""activation_policy: recompute marks per layer; the partitioner keeps less and the step is exact."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

import autosp
from autosp import collectives
from autosp.passes._attention import SDPA_TARGETS
from autosp.passes.activation_policy import layer_of_nodes
from tests.harness_fake import capture
from tests.passes.models_tiny import Attn, tiny_llama


def _step(mode: str):
    torch._dynamo.reset()
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(layers=3, hidden=64)
    compiled = torch.compile(model, backend=autosp.backend(compiler="aot_eager", recompute=mode, logits="drop"))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.item(), {n: p.grad for n, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize("mode,most", [("selective", 0.6), ("blocks", 0.5), ("attention_out", 0.5)])
def test_recompute_keeps_less_and_computes_the_same_step(mode, most):
    loss0, grads0, saved0 = _step("none")
    loss1, grads1, saved1 = _step(mode)
    assert saved1 < most * saved0, (saved0, saved1)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_marks_per_layer_attention_and_collectives_kept():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    [(gm, plan, _)] = capture(tiny_llama(layers=2), input_ids=ids, labels=ids, world=2, recompute="selective")
    layers = layer_of_nodes(gm)
    assert sorted(set(layers.values())) == [0, 1]
    for node, layer in layers.items():
        assert node.meta["ac_graph_id"] == layer
        kept = node.target in SDPA_TARGETS or getattr(node.target, "__module__", "") == collectives.__name__
        want = CheckpointPolicy.MUST_SAVE if kept or _leaves(node, layers) else CheckpointPolicy.PREFER_RECOMPUTE
        assert node.meta["recompute"] == want, node.format_node()
    # sdpa, 2 all-to-alls (q, k, v in one; the output) and the layer's output, in each layer
    assert sum(n.meta["recompute"] == CheckpointPolicy.MUST_SAVE for n in layers) == 2 * (1 + 2 + 1)
    outside = [n for n in gm.graph.nodes if n.op == "call_function" and n not in layers]
    assert outside and all("recompute" not in n.meta for n in outside)  # embedding, final norm, loss
    assert any("recompute='selective': 2 layers" in n for n in plan.notes)


def test_full_marks_every_op_of_a_layer_for_recompute():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    [(gm, plan, _)] = capture(tiny_llama(layers=2), input_ids=ids, labels=ids, world=2, recompute="full")
    layers = layer_of_nodes(gm)
    saved = [n for n in layers if n.meta["recompute"] == CheckpointPolicy.MUST_SAVE]
    assert len(saved) == 2 and all(_leaves(n, layers) for n in saved)  # each layer's output alone
    assert all(n.meta["recompute"] == CheckpointPolicy.PREFER_RECOMPUTE for n in layers if n not in saved)
    assert any("recompute='full': 2 layers" in n for n in plan.notes)


def _leaves(node, layers) -> bool:
    """Whether a value is used outside its layer (the graph's own outputs aside)."""
    return any(layers.get(u) != layers[node] for u in node.users if u.op != "output")


def test_no_repeated_layers_marks_nothing():
    [(gm, plan, _)] = capture(Attn(), torch.randint(0, 64, (1, 16)), world=1, recompute="selective")
    assert not any("recompute" in n.meta for n in gm.graph.nodes)
    assert any("no repeated layers found" in n for n in plan.notes)


def test_auto_on_cpu_without_a_budget_recomputes_nothing():
    from torch.utils.checkpoint import CheckpointPolicy

    ids = torch.randint(0, 128, (2, 16))
    [(gm, plan, _)] = capture(tiny_llama(layers=2), input_ids=ids, labels=ids, world=1, recompute="auto")
    assert any(n.meta.get("recompute") == CheckpointPolicy.MUST_SAVE for n in gm.graph.nodes)
    assert any("budget unlimited" in n and "recompute ~0 ms" in n for n in plan.notes)


def test_bad_option():
    with pytest.raises(ValueError, match="recompute"):
        autosp.Config(recompute="always")


def _backward_peak(monkeypatch, **options) -> int:
    """The estimated peak of live tensors in the backward graph AOTAutograd makes."""
    from autosp.graph_utils import live_bytes

    return max(live_bytes(_backward_graph(monkeypatch, **options).graph))


def _backward_graph(monkeypatch, **options):
    """The backward graph AOTAutograd's partitioner makes for a 2-layer model (1024 tokens)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from autosp import _torch_private

    graphs = []

    def bw(gm, inputs):
        graphs.append(gm)
        return gm

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=lambda gm, i: make_boxed_func(bw(gm, i)),
                           partition_fn=min_cut_rematerialization_partition)
    monkeypatch.setattr(_torch_private, "lookup_backend", lambda name: backend)
    torch._dynamo.reset()
    ids = torch.randint(0, 128, (1, 1024), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(layers=2, hidden=64, intermediate=256)
    # The partitioner's graph itself: rematerialize and sum_products (on with recompute) would
    # take the backend's partitioned path around the backend patched in above.
    compiled = torch.compile(model, backend=autosp.backend(logits="drop", disable_passes=("rematerialize", "sum_products"),
                                                           **options))
    compiled(input_ids=ids, labels=ids).loss.backward()
    return graphs[0]


def test_full_recompute_keeps_the_last_layer_output_so_mlp_tiles_live_one_at_a_time(monkeypatch):
    # Without the last layer's output kept, its whole forward (every tile) was recomputed
    # before the final norm's backward, and tiling lowered nothing.
    untiled = _backward_peak(monkeypatch, recompute="full")
    tiled = _backward_peak(monkeypatch, recompute="full", tile_mlp=4)
    hidden = 1024 * 64 * 4
    assert tiled < untiled - 4 * hidden, (untiled / hidden, tiled / hidden)


def test_blocks_keeps_each_layers_residual_between_attention_and_mlp():
    import operator

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    [(gm, plan, _)] = capture(tiny_llama(layers=2), input_ids=ids, labels=ids, world=2, recompute="blocks", tile_mlp=2)
    layers = layer_of_nodes(gm)
    saved = [n for n in layers if n.meta["recompute"] == CheckpointPolicy.MUST_SAVE]
    cuts = [n for n in saved if not _leaves(n, layers)]
    assert len(saved) == 4 and len(cuts) == 2 and sorted(layers[n] for n in cuts) == [0, 1]
    for cut in cuts:  # h = x + attn(x): an add after the layer's attention, read by the rest of the layer
        assert cut.target in (operator.add, torch.add)
        sdpa = next(n for n in layers if layers[n] == layers[cut] and n.target in SDPA_TARGETS)
        seen, todo = set(), [sdpa]
        while todo:
            n = todo.pop()
            seen.add(n)
            todo += [u for u in n.users if u not in seen]
        assert cut in seen
        assert any(_leaves(u, layers) for u in cut.users)  # the layer's output adds it back
    assert any("recompute='blocks': 2 layers" in n for n in plan.notes)


def test_blocks_backward_peak_is_below_full_recompute(monkeypatch):
    # With the attention block's output kept, the MLP block's backward runs before attention is
    # recomputed: the two blocks' recomputed values are never alive together.
    full = _backward_peak(monkeypatch, recompute="full", tile_mlp=4)
    blocks = _backward_peak(monkeypatch, recompute="blocks", tile_mlp=4)
    hidden = 1024 * 64 * 4
    assert blocks < full - 2 * hidden, (full / hidden, blocks / hidden)


def _attention_forwards(gm) -> int:
    """Attention forward calls in a graph, bare or wrapped to replay their random state."""
    names = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    bare = sum("scaled_dot_product" in t and "backward" not in t for t in names)
    return bare + sum("run_with_rng_state" in t for t in names)


@pytest.mark.parametrize("mode,attention_forwards", [("blocks", 2), ("full", 2), ("attention_out", 0)])
def test_attention_out_backward_never_runs_attention_forward(monkeypatch, mode, attention_forwards):
    # "full" and "blocks" (as ALST) run each layer's attention forward again in the backward;
    # "attention_out" keeps its output and log-sum-exp and recomputes only what attention reads.
    bw = _backward_graph(monkeypatch, recompute=mode, tile_mlp=2)
    assert _attention_forwards(bw) == attention_forwards
    backwards = [n for n in bw.graph.nodes if "scaled_dot_product" in str(n.target) and "backward" in str(n.target)]
    assert len(backwards) == 2


def test_attention_out_marks_attention_and_the_layer_output_alone():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    [(gm, plan, _)] = capture(tiny_llama(layers=2), input_ids=ids, labels=ids, world=2, recompute="attention_out")
    layers = layer_of_nodes(gm)
    saved = [n for n in layers if n.meta["recompute"] == CheckpointPolicy.MUST_SAVE]
    assert sorted(n.target in SDPA_TARGETS for n in saved) == [False, False, True, True]
    assert all(n.target in SDPA_TARGETS or _leaves(n, layers) for n in saved)
    # the all-to-alls are recomputed with attention's inputs (selective keeps them)
    assert any(collectives.is_collective(n.target) for n in layers)
    assert not any(collectives.is_collective(n.target) for n in saved)
    assert any("recompute='attention_out': 2 layers" in n for n in plan.notes)
