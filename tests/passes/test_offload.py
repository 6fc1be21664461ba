"""offload: saved layer activations to host memory and back; the step is unchanged.

CPU tests check the rewrite of the partitioned graphs (on CPU the ops are plain copies); the
``gpu`` tests check the streams, the pinned memory, the prefetch table and the memory saved.
"""

from __future__ import annotations

import itertools
import math
import operator

import pytest
import torch

import autosp
from autosp import _torch_private
from autosp.kernels import host_offload
from autosp.passes.chunk_attention import CHUNKED_ATTENTION
from tests.passes.models_tiny import tiny_llama


def _step(model, ids, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=autosp.backend(logits="drop", **options))
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def _offload_is_exact(model, ids, **options):
    """One step with and one without offload (aot_eager: the same ops): bitwise the same."""
    loss0, grads0 = _step(model, ids, compiler="aot_eager", **options)
    loss1, grads1 = _step(model, ids, compiler="aot_eager", offload=True, **options)
    assert torch.equal(loss0, loss1)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=0, atol=0, msg=name)


def _calls(gm, op):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == op]


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_full_recompute_offloads_each_layer_input_but_the_last_and_is_exact(graphs, compiler):
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(layers=4, hidden=64)
    loss0, grads0 = _step(model, ids, compiler=compiler, recompute="full")
    loss1, grads1 = _step(model, ids, compiler=compiler, recompute="full", offload=True)
    assert torch.equal(loss0, loss1)
    # aot_eager runs the same ops: bitwise equal; Inductor fuses differently around a reload
    tol = dict(rtol=0, atol=0) if compiler == "aot_eager" else dict(rtol=1e-5, atol=1e-6)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, **tol, msg=name)
    # The inputs of layers 0, 1 and 2 (the embedding's output, layer 0's and layer 1's outputs)
    # go to the host; layer 3's input stays: its backward runs first.
    offloads = _calls(graphs["fw"], torch.ops.autosp.offload.default)
    reloads = _calls(graphs["bw"], torch.ops.autosp.reload.default)
    assert len(offloads) == 3 and len(reloads) == 3
    outputs = next(n for n in graphs["fw"].graph.nodes if n.op == "output").args[0]
    assert all(o in outputs for o in offloads)
    # Each copy starts right after its value is made, not at the end of the forward (there the
    # device would hold every layer's input until the last layer is done).
    assert all(o.prev is o.args[0] for o in offloads)
    # In the backward, layer 2's reload prefetches layer 1's input, layer 1's layer 0's.
    hosts = [r.args[0] for r in reloads]
    assert [list(r.args[2]) for r in reloads] == [[hosts[1]], [hosts[2]], []]
    assert all(h.op == "placeholder" and h.meta["val"].device.type == "cpu" for h in hosts)
    order = list(graphs["bw"].graph.nodes)
    for r in reloads:  # placed right before the first use; the host tensor feeds reloads only
        assert all(order.index(u) > order.index(r) for u in r.users)
        assert all(u.target == torch.ops.autosp.reload.default for u in r.args[0].users)


def test_selective_offloads_what_attention_keeps(graphs):
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    model = tiny_llama(layers=3, hidden=64)
    _offload_is_exact(model, ids, recompute="selective")
    offloaded = _calls(graphs["fw"], torch.ops.autosp.offload.default)
    assert len(offloaded) > 2  # more than the layer inputs: attention's inputs and output too


@pytest.mark.parametrize("host_link", ["fast", "slow"])
def test_each_copy_starts_as_late_as_the_compute_before_its_use_allows(graphs, monkeypatch, host_link):
    """``blocks``: a layer's backward reloads its attention block's output (for the MLP block),
    then, after the MLP's matmuls, its input (for attention). Where that compute hides a copy
    ("fast": host copies cost nothing) each reload starts the next one's copy, one tensor ahead;
    where nothing hides one ("slow": at these tiny shapes the estimate says so) a layer's copies
    start at the previous layer's first reload, a layer ahead at most."""
    from autosp.passes import offload

    monkeypatch.setattr(offload, "HOST_BYTES_PER_S", math.inf if host_link == "fast" else offload.HOST_BYTES_PER_S)
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(4))
    model = tiny_llama(layers=4, hidden=64)
    _offload_is_exact(model, ids, recompute="blocks")
    reloads = _calls(graphs["bw"], torch.ops.autosp.reload.default)
    hosts = [r.args[0] for r in reloads]
    assert len(reloads) == 6  # layers 2, 1, 0: two each (layer 0's input is the embedding's output)
    order = {n: i for i, n in enumerate(graphs["bw"].graph.nodes)}
    mms = [order[n] for n in graphs["bw"].graph.nodes if n.target == torch.ops.aten.mm.default]
    for a, b in zip(reloads[::2], reloads[1::2], strict=True):  # matmuls between a layer's two reloads
        assert any(order[a] < m < order[b] for m in mms)
    if host_link == "fast":
        assert [list(r.args[2]) for r in reloads] == [[h] for h in hosts[1:]] + [[]]
    else:  # layer 2's second copy at its first reload; each next layer's at this one's first
        assert [list(r.args[2]) for r in reloads] == [hosts[1:4], [], hosts[4:6], [], [], []]


def test_use_groups_split_where_the_compute_between_two_uses_hides_another_copy(monkeypatch):
    from autosp.passes import offload

    monkeypatch.setattr(offload, "MIN_STRETCH_S", 1.0)
    nodes = [object() for _ in range(8)]
    order = {n: i for i, n in enumerate(nodes)}
    cost = [0, 0, 5, 0, 0, 1, 0, 0]  # node i's compute (s); seconds[i]: of the first i nodes
    seconds = [sum(cost[:i]) for i in range(len(cost) + 1)]
    users = [nodes[6], nodes[1], nodes[3], nodes[7]]
    # 5 s between the uses at 1 and 3, 1 s between 3 and 6: a copy of 2 s is reloaded again after 1
    assert offload.use_groups(users, order, seconds, 2.0) == [[nodes[1]], [nodes[3], nodes[6], nodes[7]]]
    assert offload.use_groups(users, order, seconds, 0.5) == [[nodes[1]], [nodes[3]], [nodes[6], nodes[7]]]
    assert offload.use_groups(users, order, seconds, 3.0) == [[nodes[1], nodes[3], nodes[6], nodes[7]]]
    monkeypatch.setattr(offload, "MIN_STRETCH_S", 10.0)  # no stretch long enough
    assert offload.use_groups(users, order, seconds, 0.5) == [[nodes[1], nodes[3], nodes[6], nodes[7]]]


def test_a_tensor_read_again_after_long_compute_is_reloaded_again_and_the_step_is_exact(graphs, monkeypatch):
    """``attention_out``: a layer's backward reads its input and attention's outputs when it
    recomputes the MLP block's input, and again after the MLP block's backward. Where that
    compute hides a second copy (here: host copies cost nothing and any stretch counts), each is
    reloaded again there, not held through it; the second copy starts after the first reload."""
    from autosp.passes import offload

    monkeypatch.setattr(offload, "HOST_BYTES_PER_S", math.inf)
    monkeypatch.setattr(offload, "MIN_STRETCH_S", 1e-12)
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(5))
    model = tiny_llama(layers=3, hidden=64)
    _offload_is_exact(model, ids, recompute="attention_out")
    reloads = _calls(graphs["bw"], torch.ops.autosp.reload.default)
    hosts = [r.args[0] for r in reloads]
    twice = {h for h in hosts if hosts.count(h) > 1}
    assert twice and len(reloads) > len(set(hosts))
    order = {n: i for i, n in enumerate(graphs["bw"].graph.nodes)}
    for h in twice:  # one copy of a tensor at a time: at most one start between two of its reloads,
        # and never at one of them (a reload starts its prefetches before it takes its own copy)
        mine = sorted(order[r] for r in reloads if r.args[0] is h)
        starts = [order[r] for r in reloads if h in r.args[2]]
        assert not set(starts) & set(mine), h.name
        bounds = [-1, *mine]
        assert all(sum(lo < s < hi for s in starts) <= 1 for lo, hi in itertools.pairwise(bounds)), h.name


def test_prefetch_points():
    """Positions of first uses 0..5 in a graph whose node i costs cost[i] seconds."""
    from autosp.passes.offload import prefetch_points

    def points(uses, layers, copy_s, cost):
        seconds = [0.0]
        for c in cost:
            seconds.append(seconds[-1] + c)
        return prefetch_points(uses, layers, copy_s, seconds)

    cost = [1.0] * 10
    # a tensor's second reload (index 2, of the tensor reloaded at 1) starts no earlier than 2:
    # copied when reached; the copies after it start there or later (in order of use)
    assert prefetch_points([0, 2, 4, 6], [3, 3, 3, 2], [1.0] * 4, [0.0, *range(1, 11)], [0, 0, 2, 0]) == \
        [None, 0, None, 2]
    assert prefetch_points([0, 2, 4, 5], [3, 3, 3, 3], [1.0, 1.0, 1.0, 3.0], [0.0, *range(1, 11)], [0, 0, 2, 0]) == \
        [None, 0, None, 2]
    # every copy hidden by one node of compute: each starts at the reload before it
    assert points([0, 2, 4, 6], [3, 3, 2, 2], [1.0] * 4, cost) == [None, 0, 1, 2]
    # copies of 3 s: the latest reload at least 3 nodes before the use, a layer ahead at most
    assert points([0, 3, 6, 9], [3, 3, 2, 2], [3.0] * 4, cost) == [None, 0, 1, 2]
    assert points([0, 2, 4, 6], [3, 3, 2, 2], [3.0] * 4, cost) == [None, 0, 0, 0]
    # nothing hides a copy of 100 s: each layer's at the previous layer's first reload
    assert points([0, 2, 4, 6, 8], [3, 3, 2, 2, 1], [100.0] * 5, cost) == [None, 0, 0, 0, 2]
    # queued copies: reload 1 (time 1) would start a 0.5 s copy in time on a free stream, but the
    # stream copies reload 1's 5 s until time 5: the copy starts as early as it may (reload 0)
    assert points([0, 1, 2, 10], [3, 3, 3, 3], [0.0, 5.0, 0.5, 0.0], cost) == [None, 0, 0, 2]
    assert points([0, 1, 2, 10], [3, 3, 3, 3], [0.0, 0.5, 0.5, 0.0], cost) == [None, 0, 1, 2]


def _plan_text(tmp_path, **options) -> str:
    """The plan report of one full-recompute offload step of a 3-layer tiny llama."""
    ids = torch.randint(0, 128, (1, 32))
    _step(tiny_llama(layers=3, hidden=64), ids, recompute="full", offload=True, dump_dir=str(tmp_path), **options)
    [text] = [p.read_text() for p in tmp_path.glob("*.txt")]
    return text


def test_plan_says_what_moved(tmp_path):
    text = _plan_text(tmp_path, compiler="aot_eager")
    assert "offload: 2 saved tensors of 2 layers to pinned host memory" in text
    assert "rematerialize: " in text and "sum_products: " in text  # the backward's notes too
    assert "without its buffer reuse" not in text  # aot_eager: no compiler-made reuse to turn off


def test_options():
    with pytest.raises(ValueError, match="'offload' needs option 'recompute'"):
        autosp.Config(offload=True)
    with pytest.raises(ValueError, match="needs a compiler that partitions"):
        autosp.Config(offload=True, recompute="full", compiler="eager")
    with pytest.raises(ValueError, match="True or False"):
        autosp.Config(offload="yes", recompute="full")


def test_dense_check():
    x = torch.empty(4, 6)
    assert host_offload.is_dense(x) and host_offload.is_dense(x.t()) and host_offload.is_dense(x[:1])
    assert not host_offload.is_dense(x[:, :3])
    assert not host_offload.is_dense(torch.empty(4, 1).expand(4, 5))
    with pytest.raises(ValueError, match="exactly once"):
        torch.ops.autosp.offload(x[:, ::2])


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_ops_round_trip_on_cuda_with_strides_and_prefetch():
    x = torch.randn(64, 1000, device="cuda").t()  # column-major: kept as is
    h = torch.ops.autosp.offload(x)
    assert h.device.type == "cpu" and h.is_pinned() and h.stride() == x.stride()
    expect = x.cpu()
    del x  # its memory may be handed out again only once the copy has read it
    junk = [torch.full((64, 1000), 7.0, device="cuda") for _ in range(4)]
    torch.cuda.synchronize()
    assert torch.equal(h, expect)
    g = torch.ops.autosp.offload(torch.arange(10.0, device="cuda"))
    y = torch.ops.autosp.reload(h, torch.device("cuda"), [g])
    assert host_offload.in_flight() == 1
    z = torch.ops.autosp.reload(g, torch.device("cuda"), [])
    assert host_offload.in_flight() == 0
    assert torch.equal(y.cpu(), expect) and y.stride() == h.stride()
    assert torch.equal(z.cpu(), torch.arange(10.0))
    del junk


@pytest.mark.gpu
def test_cuda_steps_exact_nothing_left_in_flight_and_host_memory_flat():
    torch.manual_seed(0)
    model = tiny_llama(layers=4, hidden=256, heads=4, kv_heads=2).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    loss0, grads0 = _step(model, ids, recompute="full")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=autosp.backend(logits="drop", recompute="full", offload=True))
    host = []
    for step in range(5):
        out = compiled(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.cuda.synchronize()
        assert host_offload.in_flight() == 0
        if step == 0:
            torch.testing.assert_close(out.loss.detach(), loss0, rtol=1e-3, atol=0)
            for name, p in model.named_parameters():  # bf16: Inductor fuses differently around a reload
                torch.testing.assert_close(p.grad, grads0[name], rtol=2e-2, atol=1e-3, msg=name)
        model.zero_grad(set_to_none=True)
        host.append(_host_pool())
    assert host[-1] == host[1] > 0, host  # pinned blocks are reused: the pool stops growing after step 1


def _host_pool() -> int:
    """The pinned bytes the offload's pool holds."""
    return autosp.host_memory_stats()["reserved"]


@pytest.mark.gpu
def test_cuda_offload_lowers_peak_memory():
    # Long enough that a layer's compute outlasts the copy of its input (at 16K tokens the copies
    # lagged the layers and the device blocks were still held at the peak: 43 MB saved of 160).
    seq = 65536
    torch.manual_seed(0)
    model = tiny_llama(layers=6, hidden=1024, heads=8, kv_heads=2).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    peaks, forward_peaks = {}, {}
    for offload in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=autosp.backend(logits="drop", recompute="full", offload=offload))
        for _ in range(2):  # compile and warm up, then measure
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            loss = compiled(input_ids=ids, labels=ids).loss
            forward_peaks[offload] = torch.cuda.max_memory_allocated() - before
            loss.backward()
            peaks[offload] = torch.cuda.max_memory_allocated() - before
            model.zero_grad(set_to_none=True)
    layer_input = seq * 1024 * 2
    # The backward's peak is in a middle layer (Inductor's buffers of one layer's backward vary):
    # there the device holds the earlier layers' inputs without offload (4 of them at the peak,
    # measured on an H200 on 2026-11-29), with offload the last layer's (never moved), this
    # layer's reload and the next layer's prefetch: one input less, 0.11 of 0.125 GiB measured.
    assert peaks[True] < peaks[False] - layer_input // 2, peaks
    # ... and already in the forward: each copy starts when its value is made, so the device
    # memory of the early layers' inputs is free before the forward ends.
    assert forward_peaks[True] < forward_peaks[False] - 2 * layer_input, forward_peaks


def test_chunked_attention_streams_its_chunks_and_they_are_not_offloaded_twice(graphs):
    """Selective recompute keeps chunked attention; with offload the op returns its saved chunks'
    host copies and the forward saves those (not the device q, k, v, o), the backward op takes
    them, and the layer offload pass never copies a copy."""
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(2))
    model = tiny_llama(layers=3, hidden=64)
    loss0, grads0 = _step(model, ids, compiler="aot_eager", recompute="selective")
    loss1, grads1 = _step(model, ids, compiler="aot_eager", recompute="selective", offload=True, attention_chunks=3)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-6, msg=name)
    fw, bw = graphs["fw"], graphs["bw"]
    calls = _calls(fw, CHUNKED_ATTENTION)
    assert len(calls) == 3 and all(c.args[6] is True for c in calls)  # offload=True
    outputs = next(n for n in fw.graph.nodes if n.op == "output").args[0]
    saved = [o for o in outputs[_torch_private.num_forward_returns():] if isinstance(o, torch.fx.Node)]
    from autosp.passes.offload import _host_copy

    host_chunks = [o for o in saved if _host_copy(o) and o.target is not torch.ops.autosp.offload.default]
    assert len(host_chunks) == 3 * 5 * 3  # 3 layers x (q, o, lse, k, v) x 3 chunks
    offloads = _calls(fw, torch.ops.autosp.offload.default)
    assert not any(_host_copy(o.args[0]) for o in offloads)  # no copy of a copy
    # q (and k, v) are saved as host chunks only; o is saved whole as well, for o_proj's
    # weight gradient (the layer offload pass moves it, but for the last layer's)
    for n in saved:
        if tuple(n.meta["val"].shape) == (1, 4, 48, 16):  # [B, N, S, H]: q or o
            src = n.args[0] if n.target is torch.ops.autosp.offload.default else n
            assert src.target is operator.getitem and src.args[0] in calls and src.args[1] == 0, n
    backward_ops = [n for n in bw.graph.nodes if n.op == "call_function"
                    and n.target is torch.ops.autosp.chunked_attention_backward.default]
    assert len(backward_ops) == 3 and all(n.args[8] is True for n in backward_ops)  # offloaded=True


def test_views_of_graph_inputs_are_never_offloaded():
    from autosp.passes.offload import _input_view

    g = torch.fx.Graph()
    w, x = g.placeholder("w"), g.placeholder("x")
    wt = g.call_function(torch.ops.aten.t.default, (w,))  # a weight as a layer reads it
    wv = g.call_function(torch.ops.aten.view.default, (wt, [-1]))
    y = g.call_function(torch.ops.aten.mm.default, (x, wt))
    yv = g.call_function(torch.ops.aten.view.default, (y, [-1]))
    assert _input_view(wt) and _input_view(wv)
    assert not _input_view(y) and not _input_view(yv)  # activations: offloadable


def test_offload_keep_layers_keeps_the_last_layers_on_the_device(graphs):
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(layers=4, hidden=64)
    loss0, grads0 = _step(model, ids, compiler="aot_eager", recompute="full")
    loss1, grads1 = _step(model, ids, compiler="aot_eager", recompute="full", offload=True, offload_keep_layers=3)
    assert torch.equal(loss0, loss1)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=0, atol=0, msg=name)
    # Layers 1, 2 and 3 keep their inputs; layer 0's (the embedding's output) alone goes to the host.
    offloads = _calls(graphs["fw"], torch.ops.autosp.offload.default)
    assert len(offloads) == 1 and offloads[0].args[0].target == torch.ops.aten.embedding.default


def test_offload_keep_layers_must_be_a_positive_count():
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="offload_keep_layers"):
            autosp.Config(recompute="full", offload=True, offload_keep_layers=bad)


def test_the_host_budget_takes_the_first_layers_and_the_rest_stay_on_the_device(graphs, tmp_path):
    # Each layer input is [2, 64, 64] float32, 32 KiB: a budget of 2.5 inputs holds layers 0 and
    # 1; layer 2's input stays on the device, layer 3's too (the last layer's, as always).
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(layers=4, hidden=64)
    loss0, grads0 = _step(model, ids, compiler="aot_eager", recompute="full")
    loss1, grads1 = _step(model, ids, compiler="aot_eager", recompute="full", offload=True,
                          host_memory_gb=2.5 * 32 / 2**20, dump_dir=str(tmp_path))
    assert torch.equal(loss0, loss1)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=0, atol=0, msg=name)
    offloads = _calls(graphs["fw"], torch.ops.autosp.offload.default)
    assert len(offloads) == 2 and offloads[0].args[0].target == torch.ops.aten.embedding.default
    [text] = [p.read_text() for p in tmp_path.glob("*.txt")]
    assert "holds 2 of 3 layers' saved tensors; layers 2-2 keep theirs on the device" in text, text
    assert "0.00 GiB a step in 0.00 GiB of pinned blocks" in text


def test_no_host_memory_offloads_nothing_and_says_why(graphs, tmp_path):
    ids = torch.randint(0, 128, (1, 32))
    _step(tiny_llama(layers=3, hidden=64), ids, compiler="aot_eager", recompute="full", offload=True,
          host_memory_gb=0, dump_dir=str(tmp_path))
    assert not _calls(graphs["fw"], torch.ops.autosp.offload.default)
    assert not _calls(graphs["bw"], torch.ops.autosp.reload.default)
    [text] = [p.read_text() for p in tmp_path.glob("*.txt")]
    assert "holds 0 of 2 layers' saved tensors; layers 0-1 keep theirs on the device" in text, text
    assert "offload: nothing offloaded\n" in text or text.rstrip().endswith("offload: nothing offloaded"), text


@pytest.mark.parametrize("bad", [-1, True, "4", float("nan"), float("inf")])
def test_host_memory_must_be_a_size(bad):
    with pytest.raises(ValueError, match="host_memory_gb"):
        autosp.Config(recompute="full", offload=True, host_memory_gb=bad)


@pytest.mark.parametrize("bad", [0, -2, True, 2.0, "4"])
def test_host_processes_must_be_a_count(bad):
    with pytest.raises(ValueError, match="host_processes"):
        autosp.Config(recompute="full", offload=True, host_processes=bad)


def test_host_memory_is_about_offload():
    with pytest.raises(ValueError, match="'host_memory_gb' bounds offload"):
        autosp.Config(recompute="full", host_memory_gb=8)
    autosp.Config(recompute="auto", host_memory_gb=8)  # the planner plans with it


def test_the_offloaded_layers_are_part_of_what_the_ranks_agree_on():
    # What the forward offloads decides what the backward rematerializes (and so which
    # all-to-alls it runs again): ranks that offload different layers must fail check_plan.
    from autosp.plan import Plan

    one, other = Plan(world=2), Plan(world=2)
    assert one.digest() == other.digest()
    one.memory["offloaded_layers"], other.memory["offloaded_layers"] = [0, 1], [0, 1, 2]
    assert one.digest() != other.digest()
    assert one.fingerprint()["offloaded_layers"] == [0, 1]


def _forward_code(**options) -> str:
    """The Inductor source of a tiny llama's forward graph under ``options`` (the forward of a
    training step: AOTAutograd compiles the backward at its first call; ``dump_dir``: the plan
    report written there too)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = tiny_llama(layers=3, hidden=64)
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(model, backend=autosp.backend(compiler="inductor", logits="drop", **options))
    _, (forward,) = run_and_get_code(lambda: compiled(input_ids=ids, labels=ids, use_cache=False).loss)
    return forward


@pytest.mark.parametrize("options", [dict(recompute="full", offload=True),
                                     dict(recompute="selective", offload=True, attention_chunks=3)],
                         ids=["offload", "chunk streaming"])
def test_a_forward_that_copies_to_the_host_hands_no_buffer_on(options, tmp_path):
    """A copy to the host reads its tensor on the transfer stream after the call returns: the
    forward's Inductor code neither gives a dead buffer to a later one (``# reuse``) nor writes
    a kernel's output over an input (``in_out_ptr``), and the plan says so; the same forward
    without the copies does both (the check can tell: once, for full recompute)."""
    with_copies = _forward_code(**options, dump_dir=str(tmp_path))
    assert "autosp.offload" in with_copies or "chunked_attention.default(" in with_copies
    assert "# reuse" not in with_copies and "in_out_ptr" not in with_copies
    assert any("Inductor compiles it without its buffer reuse and in-place buffers" in p.read_text()
               for p in tmp_path.glob("*.txt"))
    if options["recompute"] == "full":
        without = _forward_code(recompute="full")
        assert "# reuse" in without and "in_out_ptr" in without


def test_a_value_an_op_may_write_into_later_is_not_offloaded():
    """Inductor may turn a functional ``index_put`` on a value dead after it into a write into
    the value's memory; a value (or a view of it) read by one stays on the device."""
    from autosp.passes.offload import _written_later

    g = torch.fx.Graph()
    x, i, v = g.placeholder("x"), g.placeholder("i"), g.placeholder("v")
    y = g.call_function(torch.ops.aten.mul.Tensor, (x, 2.0))
    view = g.call_function(torch.ops.aten.view.default, (y, [4, 4]))
    put = g.call_function(torch.ops.aten.index_put.default, (view, [i], v))
    z = g.call_function(torch.ops.aten.mul.Tensor, (x, 3.0))
    g.output((put, z))
    base = torch.zeros(16)
    y.meta["val"], view.meta["val"] = base, base.view(4, 4)
    put.meta["val"], z.meta["val"] = torch.zeros(4, 4), torch.zeros(16)
    assert _written_later(y)
    assert not _written_later(z)


def test_offload_keeps_a_value_a_later_op_may_write_into_and_says_so(graphs, tmp_path, monkeypatch):
    """The pass itself: with every saved activation counted as written later, nothing is
    offloaded and the plan names them."""
    from autosp.passes import offload as offload_pass

    monkeypatch.setattr(offload_pass, "_written_later", lambda node: True)
    text = _plan_text(tmp_path, compiler="aot_eager")
    assert "offload: 2 saved tensors stay on the device because a later op may be made to write" in text
    assert not _calls(graphs["fw"], torch.ops.autosp.offload.default)


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(recompute="full"), dict(recompute="selective", attention_chunks=2)],
                         ids=["offload", "chunk streaming"])
def test_cuda_copies_to_the_host_that_start_late_still_read_what_was_made(options):
    """The transfer stream held back (a 1 GiB upload queued on it first) while the forward runs:
    every copy to the host starts after the compute stream has gone past it. The step equals the
    one without offload; with Inductor's buffer reuse left on (the control) it does not."""
    import importlib

    autosp_backend = importlib.import_module("autosp.backend")  # the module: autosp.backend is the function

    torch.manual_seed(0)
    model = tiny_llama(layers=4, hidden=256, heads=4, kv_heads=2).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    loss0, grads0 = _step(model, ids, **options)
    upload = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)

    def held_back_step(settings):
        torch._dynamo.reset()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(autosp_backend, "HOST_COPY_SETTINGS", settings)
            compiled = torch.compile(model, backend=autosp.backend(logits="drop", offload=True, **options))
            compiled(input_ids=ids, labels=ids).loss.backward()  # compiles
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            with torch.cuda.stream(host_offload._transfer_stream(torch.device("cuda"))):
                upload.to("cuda", non_blocking=True)
            out = compiled(input_ids=ids, labels=ids)
            out.loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return out.loss.detach(), grads

    def error(loss, grads):
        return max([(loss - loss0).abs().item() / loss0.abs().item()]
                   + [((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in grads0.items()])

    from autosp.passes.offload import HOST_COPY_SETTINGS

    assert error(*held_back_step(HOST_COPY_SETTINGS)) < 0.05  # bf16: Inductor fuses differently around a copy
    assert error(*held_back_step({})) > 0.2  # the control: buffers handed on under the copies
