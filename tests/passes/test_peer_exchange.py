"""peer_exchange: each all-to-all of the group and its wait -> the copy engines' start and finish,
the work between them kept there; graphs the runtime could not run keep NCCL. The exchange
itself moves data between GPUs: tests/distributed/test_peer_exchange_nccl.py (2 GPUs) checks it
against NCCL's all-to-all, and the NCCL parity file runs whole models with it."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

import autosp
from autosp.passes.peer_exchange import peer_exchange_pass

A2A = torch.ops._c10d_functional.all_to_all_single.default
WAIT = torch.ops._c10d_functional.wait_tensor.default
MM, RELU = torch.ops.aten.mm.default, torch.ops.aten.relu.default


def _ops():
    import autosp.kernels.peer_exchange  # noqa: F401

    return torch.ops.autosp.peer_exchange_start.default, torch.ops.autosp.peer_exchange_finish.default


def _graph(order: str, device: str = "cuda", group: str = "sp", splits=([32, 32], [32, 32])):
    """Two all-to-alls (a [64, 8] and a [64, 16] tensor) and a matmul; ``order`` is how their
    issues (``a``, ``b``), waits (``A``, ``B``) and the matmul (``m``) follow each other."""
    with FakeTensorMode():
        vals = dict(x=torch.empty(64, 8, device=device), y=torch.empty(64, 16, device=device),
                    w=torch.empty(16, 16, device=device))
        g = fx.Graph()
        ph = {k: g.placeholder(k) for k in vals}
        for k, v in vals.items():
            ph[k].meta["val"] = v
        made = {}
        for step in order:
            if step in "ab":
                src = ph["x" if step == "a" else "y"]
                n = g.call_function(A2A, (src, *splits, group))
                n.meta["val"] = src.meta["val"].clone()
            elif step in "AB":
                c = made[step.lower()]
                n = g.call_function(WAIT, (c,))
                n.meta["val"] = c.meta["val"].clone()
                n.meta["eager_input_vals"] = ((c.meta["val"],), {})  # AOTAutograd's; never the finish's
            else:
                n = g.call_function(MM, (ph["w"], ph["w"]))
                n.meta["val"] = vals["w"] @ vals["w"]
            made[step] = n
        out = [g.call_function(RELU, (made[k],)) for k in "AB" if k in made]
        for o in out:
            o.meta["val"] = o.args[0].meta["val"].clone()
        out += [made[k] for k in "m" if k in made]
        g.output(tuple(out))
    return fx.GraphModule(torch.nn.Module(), g)


def test_each_all_to_all_becomes_a_start_and_a_finish_with_the_work_between_kept():
    start, finish = _ops()
    gm = _graph("abmAB")
    assert peer_exchange_pass(gm, "sp", 2, backward=False) == (2, None)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    targets = [n.target for n in nodes]
    assert targets[:5] == [start, start, MM, finish, finish] and A2A not in targets and WAIT not in targets
    s_a, s_b = nodes[0], nodes[1]
    f_a, f_b = nodes[3], nodes[4]
    assert f_a.args[0] is s_a and f_b.args[0] is s_b and f_a.args[1] is s_a.args[0]  # finish reads x: kept alive
    assert [s.args[4] for s in (s_a, s_b)] == [0, 1]  # sites: the exchange's place in the graph
    assert s_a.args[5] == s_b.args[5] == 32 * 16 * 4  # capacity: the largest row block (32 rows of y)
    assert tuple(f_a.meta["val"].shape) == (64, 8) and "eager_input_vals" not in f_a.meta
    gm.graph.lint()


def test_every_start_carries_the_watchdogs_timeout():
    start, _ = _ops()
    gm = _graph("abmAB")
    peer_exchange_pass(gm, "sp", 2, backward=False, timeout=7.5)
    assert [n.args[6] for n in gm.graph.nodes if n.target is start] == [7.5, 7.5]


def test_backward_sites_are_apart_from_the_forwards():
    gm = _graph("aA")
    assert peer_exchange_pass(gm, "sp", 2, backward=True) == (1, None)
    start, _ = _ops()
    assert next(n for n in gm.graph.nodes if n.target is start).args[4] == 2048


def test_exchanges_that_do_not_finish_in_order_keep_nccl():
    gm = _graph("abBA")
    assert peer_exchange_pass(gm, "sp", 2, backward=False) == (0, "its all-to-alls do not finish in the order "
                                                                   "they start")
    assert sum(n.target is A2A for n in gm.graph.nodes) == 2


def test_another_groups_all_to_all_is_left_alone():
    gm = _graph("aA", group="other")
    assert peer_exchange_pass(gm, "sp", 2, backward=False) == (0, None)


def test_uneven_splits_of_the_head_split_are_taken():
    gm = _graph("aA", splits=([0, 64], [0, 64]))  # split_projections: nothing to itself
    assert peer_exchange_pass(gm, "sp", 2, backward=False) == (1, None)
    start, _ = _ops()
    assert next(n for n in gm.graph.nodes if n.target is start).args[5] == 64 * 8 * 4


def test_tensors_off_cuda_are_refused_loudly():
    with pytest.raises(ValueError, match="CUDA tensors"):
        peer_exchange_pass(_graph("aA", device="cpu"), "sp", 2, backward=False)


def test_the_ops_fake_shapes():
    start, finish = _ops()
    with FakeTensorMode():
        x = torch.empty(6, 4, 2, device="cuda")
        t = start(x, [2, 4], [3, 3], "sp", 0, 1 << 20, 600.0)
        y = finish(t, x, [2, 4], [3, 3], "sp", 0)
    assert tuple(t.shape) == (0,) and tuple(y.shape) == (6, 4, 2) and y.device.type == "cuda"


def test_the_option():
    assert autosp.Config(exchange="peer_copy").exchange == "peer_copy"
    with pytest.raises(ValueError, match="exchange"):
        autosp.Config(exchange="nvshmem")
    with pytest.raises(ValueError, match="partitioned"):
        autosp.Config(exchange="peer_copy", compiler="eager")
    assert "peer_exchange" in autosp.pipeline.POST_PARTITION_PASSES


def test_inductor_lowers_the_rewritten_graph_in_its_order():
    """Inductor compiles the ops as extern calls, the matmul between the start and the finish
    (the ops run on CUDA alone: this graph is compiled, not run)."""
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.utils import run_and_get_code

    gm = _graph("abmAB", device="cpu")
    assert peer_exchange_pass(gm, "sp", 2, backward=False, require_cuda=False) == (2, None)
    inputs = [torch.randn(64, 8), torch.randn(64, 16), torch.randn(16, 16)]
    torch._dynamo.reset()
    _, code = run_and_get_code(lambda: compile_fx_inner(gm, inputs))
    lines = [ln.strip() for ln in "\n".join(code).splitlines()]
    calls = [i for i, ln in enumerate(lines) if not ln.startswith("#") and (
        "autosp.peer_exchange_start.default(" in ln or "autosp.peer_exchange_finish.default(" in ln
        or "extern_kernels.mm(" in ln)]
    kinds = ["start" if "start" in lines[i] else "finish" if "finish" in lines[i] else "mm" for i in calls]
    assert kinds == ["start", "start", "mm", "finish", "finish"], [lines[i] for i in calls]


def test_the_backend_refuses_the_copy_engines_for_cpu_tensors():
    """A model on the CPU compiled with exchange='peer_copy' fails at its compile, saying why."""
    from tests.distributed.models import build
    from tests.harness_fake import fake_group

    model = build("llama")
    ids = torch.randint(0, 96, (1, 32))
    torch._dynamo.reset()
    with fake_group(2), pytest.raises(Exception, match="exchange='peer_copy' moves CUDA tensors"):
        compiled = torch.compile(model, backend=autosp.backend(compiler="aot_eager", exchange="peer_copy"))
        compiled(input_ids=ids, labels=ids, use_cache=False).loss.backward()


def test_row_blocks_of_different_sizes_keep_nccl():
    """The receive buffers' size must be the same on every rank: the pass takes splits whose
    nonzero entries are one block size (equal, or the head split's) and nothing else."""
    gm = _graph("aA", splits=([16, 48], [16, 48]))
    done, why = peer_exchange_pass(gm, "sp", 2, backward=False)
    assert done == 0 and "different sizes" in why


def test_a_symbolic_shape_keeps_nccl():
    """The buffers are sized by the graph: a dynamic sequence length would fix it with a guard."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    x = mode.from_tensor(torch.empty(2, 64, 8), symbolic_context=StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.STATIC, DimDynamic.DYNAMIC, DimDynamic.STATIC]))
    g = fx.Graph()
    p = g.placeholder("x")
    p.meta["val"] = x
    c = g.call_function(A2A, (p, [1, 1], [1, 1], "sp"))
    c.meta["val"] = x
    w = g.call_function(WAIT, (c,))
    w.meta["val"] = x
    g.output((w,))
    done, why = peer_exchange_pass(fx.GraphModule(torch.nn.Module(), g), "sp", 2, backward=False)
    assert done == 0 and "symbolic" in why


def test_a_strided_input_is_copied_once_and_the_copy_is_what_the_finish_holds():
    """Inductor gives an op a pass inserted no layout constraint of its own: a transposed input
    reached the start as a strided view, and the op's own ``contiguous()`` copied it on the
    compute stream (2.9 ms a step at 16K). The pass makes the copy one node, one contiguous buffer
    in Inductor's code, which the start reads and the finish keeps alive."""
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.utils import run_and_get_code

    aten = torch.ops.aten
    g = fx.Graph()
    with FakeTensorMode():
        a, w = g.placeholder("a"), g.placeholder("w")
        a.meta["val"], w.meta["val"] = torch.empty(64, 32), torch.empty(32, 32)

        def call(op, *args):
            n = g.call_function(op, args)
            n.meta["val"] = op(*[x.meta["val"] if isinstance(x, fx.Node) else x for x in args])
            return n

        t = call(aten.permute.default, call(aten.mm.default, a, w), [1, 0])  # [32, 64], strides (1, 32)
        c = call(A2A, t, [16, 16], [16, 16], "sp")
        g.output((call(RELU, call(WAIT, c)),))
    gm = fx.GraphModule(torch.nn.Module(), g)
    assert peer_exchange_pass(gm, "sp", 2, backward=False, require_cuda=False) == (1, None)
    start, finish = _ops()
    (s,) = [n for n in gm.graph.nodes if n.target is start]
    (f,) = [n for n in gm.graph.nodes if n.target is finish]
    assert s.args[0] is f.args[1] and s.args[0].target is aten.clone.default
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):  # the node flag is not in the cache key
        _, code = run_and_get_code(lambda: compile_fx_inner(gm, [torch.randn(64, 32), torch.randn(32, 32)]))
    code = "\n".join(code)
    lines = [ln.strip() for ln in code.splitlines() if "peer_exchange_" in ln and not ln.strip().startswith("#")]
    read = [ln.split("(", 1)[1].split(",")[0] for ln in lines if "start.default(" in ln]
    held = [ln.split("(", 1)[1].split(",")[1].strip() for ln in lines if "finish.default(" in ln]
    assert read == held and "reinterpret_tensor" not in read[0], lines
    assert f"{read[0]} = empty_strided_cpu((32, 64), (64, 1)" in code, code  # one buffer, contiguous
