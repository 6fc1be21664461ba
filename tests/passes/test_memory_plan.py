"""memory_plan: the min-cut planner on synthetic layer graphs (it respects the budget, never
recomputes a collective, prefers offload when recompute is expensive), and recompute="auto" on
a model (exact loss and gradients, fp32: loss 1e-6 relative, gradients 1e-5)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import autosp
from autosp import collectives
from autosp.kernels.pinned_pool import PAGE, block_bytes
from autosp.passes import memory_plan
from tests.harness_fake import capture
from tests.passes.models_tiny import tiny_llama

MiB = 2**20


def _layers(n_layers: int, seq: int, hidden: int = 64, heads: int = 4):
    """``n_layers`` layers of: norm-ish pointwise, q/k/v projections, an all-to-all stand-in,
    causal attention, output projection, an MLP with a wide intermediate; values are empty
    tensors of the real shapes (the planner reads shapes only)."""
    g = fx.Graph()
    layers = {}

    def node(target, args, shape, layer, op="call_function"):
        n = g.create_node(op, target, args, {})
        n.meta["val"] = torch.empty(shape, device="meta")
        if layer is not None:
            layers[n] = layer
        return n

    x = node("x", (), (1, seq, hidden), None, op="placeholder")
    w = node("w", (), (hidden, hidden), None, op="placeholder")
    head = hidden // heads
    for i in range(n_layers):
        h = node(torch.rsqrt, (x,), (1, seq, hidden), i)
        q = node(F.linear, (h, w), (1, seq, hidden), i)
        k = node(F.linear, (h, w), (1, seq, hidden), i)
        v = node(F.linear, (h, w), (1, seq, hidden), i)
        qh, kh, vh = (node(collectives.all_reduce_sum, (t, "g", 1), (1, heads, seq, head), i) for t in (q, k, v))
        o = node(F.scaled_dot_product_attention, (qh, kh, vh, None, 0.0, True), (1, heads, seq, head), i)
        o2 = node(torch.reshape, (o, (1, seq, hidden)), (1, seq, hidden), i)
        a = node(F.linear, (o2, w), (1, seq, hidden), i)
        up = node(F.linear, (a, w), (1, seq, 4 * hidden), i)
        act = node(F.silu, (up,), (1, seq, 4 * hidden), i)
        x = node(torch.add, (a, act), (1, seq, hidden), i)
    g.output(node(torch.rsqrt, (x,), (1, seq, hidden), None))  # the final norm, outside the layers
    return g, layers


def _plan(budget_mib: float, seq: int = 512, allow_offload: bool = False, layers: int = 4):
    _, marks = _layers(layers, seq)
    return memory_plan.plan_layers(marks, parameters_bytes=MiB, budget=int(budget_mib * MiB),
                                   allow_offload=allow_offload), marks


def test_respects_the_budget_and_keeps_less_as_it_shrinks():
    loose, _ = _plan(1e6)
    assert loose.fits and loose.recompute_s == 0  # nothing recomputed when memory is free
    least, _ = _plan(1e-3)
    assert not least.fits and "DOES NOT FIT" in least.summary() and least.predicted_peak < loose.predicted_peak
    kept, recompute = [], []
    for i in range(6):  # budgets from the loose plan's peak down to the least-memory plan's
        budget = (loose.predicted_peak - i * (loose.predicted_peak - least.predicted_peak) / 5) / MiB
        plan, _ = _plan(budget)
        assert plan.fits and plan.predicted_peak <= budget * MiB
        kept.append(plan.kept)
        recompute.append(plan.recompute_s)
    assert kept == sorted(kept, reverse=True) and len(set(kept)) >= 3  # intermediate plans exist
    assert recompute == sorted(recompute)  # less memory costs more recompute


@pytest.mark.parametrize("budget", [1e6, 13, 11.5, 1])
def test_never_recomputes_a_collective(budget):
    plan, marks = _plan(budget)
    recomputed = set().union(*(p.recomputed for p in plan.layers.values()))
    assert not any(n.target is collectives.all_reduce_sum for n in recomputed)
    kept = set().union(*(p.kept for p in plan.layers.values()))
    assert all(n in kept for n in marks if n.target is collectives.all_reduce_sum)  # attention reads them


def test_prefers_offload_when_recompute_is_expensive():
    """At 256K tokens attention dominates a layer's time and hides its copies: under a budget
    the kept values exceed, the plan offloads and recomputes no attention. At 16K the copies
    cost more than recomputing the cheap ops, and the same squeeze is met by recompute."""
    def squeezed(seq, allow_offload):
        free, _ = _plan(1e9, seq=seq)
        budget = (free.predicted_peak - free.kept // 2) / MiB  # half of what a free plan keeps must go
        return _plan(budget, seq=seq, allow_offload=allow_offload)

    long_plan, _ = squeezed(262144, allow_offload=True)
    assert long_plan.fits and long_plan.offload and long_plan.host > 0 and long_plan.exposed_copy_s == 0
    recomputed = set().union(*(p.recomputed for p in long_plan.layers.values()))
    assert not any(n.target is F.scaled_dot_product_attention for n in recomputed)
    without, _ = squeezed(262144, allow_offload=False)
    assert long_plan.recompute_s < without.recompute_s
    short_plan, _ = squeezed(16384, allow_offload=True)
    assert short_plan.fits and not short_plan.offload


def test_the_layer_output_is_kept():
    plan, marks = _plan(1)  # least memory: everything else is recomputed
    outputs = [n for n in marks if n.target is torch.add]
    kept = set().union(*(p.kept for p in plan.layers.values()))
    assert all(n in kept for n in outputs)


def _exact_step(tmp_path, budget_gb: float) -> str:
    """One step of a 3-layer model under recompute="auto" against the eager model; the plan text."""
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(3))
    ref_model, model = tiny_llama(layers=3, hidden=64), tiny_llama(layers=3, hidden=64)
    ref = ref_model(input_ids=ids, labels=ids, use_cache=False).loss
    ref.backward()
    torch._dynamo.reset()
    backend = autosp.backend(compiler="aot_eager", recompute="auto", memory_budget_gb=budget_gb, dump_dir=str(tmp_path))
    loss = torch.compile(model, backend=backend)(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    [text] = [p.read_text() for p in tmp_path.glob("*.txt")]
    return text


def test_auto_on_a_model_is_exact_and_reports_its_plan(tmp_path):
    text = _exact_step(tmp_path, 5 / 1024)
    assert "memory plan: budget 5 MiB" in text
    [page] = [p.read_text() for p in tmp_path.glob("*.html")]
    assert "<svg" in page and "budget" in page


def test_auto_marks_a_middle_plan():
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(3))
    from torch.utils.checkpoint import CheckpointPolicy

    marks = {}
    for budget in (1.0, 5 / 1024, 4 / 1024):
        [(gm, plan, _)] = capture(tiny_llama(layers=3, hidden=64), input_ids=ids, labels=ids, use_cache=False,
                                  world=1, recompute="auto", memory_budget_gb=budget)
        marks[budget] = sum(n.meta.get("recompute") == CheckpointPolicy.MUST_SAVE for n in gm.graph.nodes)
    assert marks[1.0] > marks[5 / 1024] > marks[4 / 1024] > 0


@pytest.mark.parametrize("options,match", [
    ({"memory_budget_gb": 10}, "recompute='auto'"),
    ({"recompute": "auto", "memory_budget_gb": -1}, "positive"),
    ({"recompute": "auto", "memory_budget_gb": True}, "positive"),
])
def test_bad_budgets(options, match):
    with pytest.raises(ValueError, match=match):
        autosp.Config(**options)


def test_a_planned_offload_runs_the_offload_passes_and_is_exact(tmp_path):
    """A budget just under the least-memory plan without offload: the planner turns offload on
    (Config.offload is off) and the region's saved values go to the host."""
    text = _exact_step(tmp_path, 3.85 / 1024)  # the least without offload: 3.89 MiB
    assert "offload on" in text and "saved tensors of 2 layers to pinned host memory" in text


@pytest.mark.gpu
def test_cuda_first_forward_records_the_measured_peak(tmp_path):
    ids = torch.randint(0, 128, (2, 64), device="cuda")
    model = tiny_llama(layers=3, hidden=64).cuda()
    torch._dynamo.reset()
    backend = autosp.backend(recompute="auto", dump_dir=str(tmp_path))
    torch.compile(model, backend=backend)(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    [page] = [p.read_text() for p in tmp_path.glob("*.html")]
    assert "measured peak after the first forward" in page


def test_pinned_blocks_are_whole_pages():
    assert [block_bytes(n) for n in (0, 1, 3, PAGE, PAGE + 1)] == [0, PAGE, PAGE, PAGE, 2 * PAGE]
    assert block_bytes(3 * 2**29) == 3 * 2**29  # a 1.5 GiB tensor takes 1.5 GiB, not 2


def test_offloaded_layers_are_the_first_that_fit():
    layer_bytes = {0: 4, 1: 4, 2: 4, 5: 4}
    assert memory_plan.offloaded_layers(layer_bytes, 11) == [0, 1]
    assert memory_plan.offloaded_layers(layer_bytes, 16) == [0, 1, 2, 5]
    assert memory_plan.offloaded_layers(layer_bytes, 3) == []
    assert memory_plan.offloaded_layers({0: 8, 1: 1}, 4) == []  # a prefix: layer 1 does not jump the queue


def test_the_host_budget_defaults_to_the_hosts_share(monkeypatch):
    monkeypatch.setattr(memory_plan, "_host_memory_bytes", lambda: 100 * 2**30)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # one process a GPU
    assert memory_plan.host_budget(None) == int(25 * 2**30 * (1 - memory_plan.MARGIN))
    assert memory_plan.host_budget(3.0) == 3 * 2**30  # the option wins
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # no GPU: one process
    assert memory_plan.host_budget(None) == int(100 * 2**30 * (1 - memory_plan.MARGIN))
    assert memory_plan.host_budget(None, host_processes=4) == int(25 * 2**30 * (1 - memory_plan.MARGIN))
    monkeypatch.setattr(memory_plan, "_host_memory_bytes", lambda: None)
    assert memory_plan.host_budget(None) >= 2**60  # the host does not say: unbounded


def test_the_host_memory_is_the_installed_memory_or_the_containers_limit(monkeypatch, tmp_path):
    import builtins

    files = {"/proc/meminfo": "MemTotal:       1048576 kB\nMemAvailable:    524288 kB\n",
             "/sys/fs/cgroup/memory.max": "max\n"}
    real_open = builtins.open

    def fake_open(path, *a, **k):
        if path in files:
            target = tmp_path / path.strip("/").replace("/", "_")
            target.write_text(files[path])
            return real_open(target, *a, **k)
        if str(path).startswith(("/proc/meminfo", "/sys/fs/cgroup")):
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert memory_plan._host_memory_bytes() == 2**30  # MemTotal (not what is free: the same on every rank)
    files["/sys/fs/cgroup/memory.max"] = str(2**28) + "\n"
    assert memory_plan._host_memory_bytes() == 2**28  # a container's limit below it


def test_keep_layers_below_one_is_refused():
    _, marks = _layers(2, 64)
    with pytest.raises(ValueError, match="keep_layers"):
        memory_plan.plan_layers(marks, parameters_bytes=MiB, budget=2**40, allow_offload=True, keep_layers=0)


def test_the_plan_offloads_no_more_than_the_host_holds():
    """Under a device budget only an offload meets, a host budget of about two layers' kept
    values moves the first two layers only; the plan's host bytes stay within it, the last
    ``keep_layers`` are never moved, and the device keeps the rest (a higher predicted peak)."""
    free, _ = _plan(1e9, seq=262144, layers=6)
    budget = (free.predicted_peak - free.kept // 2) / MiB

    def plan(host_budget, keep_layers=1):
        _, marks = _layers(6, 262144)
        return memory_plan.plan_layers(marks, parameters_bytes=MiB, budget=int(budget * MiB), allow_offload=True,
                                       host_budget=host_budget, keep_layers=keep_layers)

    unbounded = plan(2**62)
    assert unbounded.offload and unbounded.offloaded == (0, 1, 2, 3, 4)
    layer = max(block_bytes(memory_plan._bytes(n)) for p in unbounded.layers.values() for n in p.kept)
    per_layer = unbounded.host // 5
    bounded = plan(2 * per_layer + layer // 2)
    assert bounded.offloaded == (0, 1) and bounded.host <= 2 * per_layer + layer // 2
    assert bounded.kept > unbounded.kept and "layers 0-1 offloaded" in bounded.summary()
    assert plan(2**62, keep_layers=4).offloaded == (0, 1)
    nothing = plan(0)
    assert not nothing.offload and nothing.host == 0


def test_a_kept_value_counts_in_the_layer_whose_backward_reads_it_first():
    # As the offload pass picks: a layer's output is the next layer's input, so it moves (or
    # stays) with the next layer; the last layer's input stays with the last layer.
    plan, marks = _plan(1e-3, layers=3)  # the least-memory plan: the layers' outputs kept
    outputs = {marks[n]: n for n in marks if n.target is torch.add}
    kept = set().union(*(p.kept for p in plan.layers.values()))
    assert set(outputs.values()) <= kept
    device, host = memory_plan._offloadable(plan.layers, marks, resident={2})
    size = memory_plan._bytes(outputs[0])
    # layer 1 moves layer 0's output (and its own values); layer 1's output stays with layer 2.
    inside = {i: sum(memory_plan._bytes(n) for n in plan.layers[i].kept if n.target is not torch.add) for i in (0, 1)}
    assert device[0] == inside[0] and device[1] == inside[1] + size, (device, inside, size)
    assert 2 not in device and host[1] >= device[1]
