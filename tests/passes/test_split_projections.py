"""split_projections (passes/split_projections.py): q, k and v made one head chunk at a time, the
other ranks' chunks first and sent, this rank's own chunk made while they cross; what it refuses;
the order Inductor keeps. Numbers: the gloo parity cases with ``split_projections`` (tests/distributed)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from autosp import collectives
from autosp.passes.split_projections import _chain, _clone, _Refused
from tests.harness_fake import capture, inductor_code, nodes_calling


def _ids(B=1, S=32, vocab=96):
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model,rank", [("llama", 0), ("llama", 1), ("qwen3", 1), ("qwen2", 0)])
def test_the_peers_chunks_are_made_and_sent_before_the_own_chunk(model, rank):
    """Per layer: the q, k, v projections' weights narrowed to the peer's rows, the exchange
    issued, then the own rows' projections, then the exchange's end; no whole projection left."""
    from tests.distributed.models import build

    ids = _ids()
    [(gm, plan, _)] = capture(build(model), input_ids=ids, labels=ids, use_cache=False, world=2, rank=rank,
                              split_projections=True)
    assert nodes_calling(gm, collectives.seq_to_head_many) == []
    starts, finishes = nodes_calling(gm, collectives.exchange_start), nodes_calling(gm, collectives.exchange_finish)
    assert len(starts) == len(finishes) == 2
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    peer, lo = 1 - rank, -1
    for start, finish in zip(starts, finishes, strict=True):
        narrows = [n for n in nodes_calling(gm, torch.narrow) if lo < order[n] < order[finish]]
        lo = order[finish]
        assert len(narrows) == 6 * (2 if model == "qwen2" else 1)  # q, k, v weights (qwen2: and biases) x 2 chunks
        chunk = {n: n.args[2] // n.args[3] for n in narrows}
        assert {chunk[n] for n in narrows if order[n] < order[start]} == {peer}
        assert {chunk[n] for n in narrows if order[n] > order[start]} == {rank}
    weights = [n.args[1] for n in nodes_calling(gm, torch._C._nn.linear)]
    assert not any("q_proj" in w.name for w in weights)  # no whole q_proj left
    q_rows = [w.args[3] for w in weights if w.target is torch.narrow and "q_proj" in w.args[0].name]
    assert q_rows == [16, 16, 16, 16]  # 4 heads of 8 in two chunks of 2, in both layers
    assert any("made peers' head chunks first" in n for n in plan.notes)
    assert [c.node for c in plan.collectives if c.kind == "all_to_all"][0] == starts[0].name


def test_a_fused_qkv_projection_is_left_as_one_all_to_all():
    """GPT-2 makes q, k, v with one Conv1D (addmm) and splits it: no linear per value to narrow."""
    from tests.distributed.models import build

    ids = _ids()
    regions = capture(build("gpt2"), input_ids=ids, labels=ids, use_cache=False, world=2, split_projections=True)
    assert sum(len(nodes_calling(r.gm, collectives.seq_to_head_many)) for r in regions) == 2
    assert all(nodes_calling(r.gm, collectives.exchange_start) == [] for r in regions)
    assert sum("left as one all-to-all" in n for r in regions for n in r.plan.notes) == 2


def _graph(fn, *shapes):
    """``fn``'s graph with real values as ``meta["val"]`` (all _chain reads) and the site: the
    last call, which stands for the all-to-all."""
    gm = fx.symbolic_trace(fn)
    args = iter([torch.randn(s) for s in shapes])
    env = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(args)
        elif n.op in ("call_function", "call_method"):
            a = fx.node.map_arg(n.args, env.get)
            k = fx.node.map_arg(n.kwargs, env.get)
            env[n] = n.target(*a, **k) if n.op == "call_function" else getattr(a[0], n.target)(*a[1:], **k)
        n.meta["val"] = env.get(n)
    site = [n for n in gm.graph.nodes if n.op == "call_function"][-1]
    return gm, site


W, L, N, H = (8, 8), 5, 2, 4  # weight [N*H, hidden], 5 tokens, 2 heads of 4


def _site(x):
    return torch.neg(x)


@pytest.mark.parametrize("spelling", ["view", "torch.reshape"])
def test_each_head_chunk_of_a_rope_chain_is_that_chunk_of_the_whole(spelling):
    """RoPE (cos over the heads, halves rotated along the head dim) after the projection: the
    chain is found, and its clone for chunk d, from the weight's rows of d, is heads d of it."""
    def f(x, w, cos):
        y = F.linear(x, w)
        q = (y.view(1, L, N, H) if spelling == "view" else torch.reshape(y, (1, L, N, H))).transpose(1, 2)
        q = q * cos + torch.cat((-q[..., 2:], q[..., :2]), dim=-1) * cos
        return _site(q)

    gm, site = _graph(f, (1, L, 8), W, (1, 1, L, H))
    x = site.args[0]
    chain = _chain(x, 1, 2, site)
    assert chain.root.target in (F.linear, torch._C._nn.linear) and chain.heads[x] == 1
    for d in range(2):
        with gm.graph.inserting_before(site):
            clone = _clone(gm.graph, chain, d, 2, contextlib.nullcontext())  # real values: no fake mode
        torch.testing.assert_close(clone.meta["val"], x.meta["val"][:, d:d + 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case,why", [
    ("heads_inside", "heads of"),  # columns read as [H, N]: a column block is not a head block
    ("per_head_scale", "varies over the heads"),
    ("mean_over_heads", "reduces over the heads"),
    ("slice_of_heads", "slices the heads"),
    ("read_elsewhere", "read elsewhere"),
    ("fused_split", "not one tensor"),  # one projection for two values, split: no per-value weight rows
    ("transpose_by_name", "not read by the rule"),
])
def test_ops_that_mix_heads_refuse(case, why):
    def f(x, w, s):
        y = F.linear(x, w)
        if case == "heads_inside":
            q = y.view(1, L, H, N).permute(0, 3, 1, 2)
        elif case == "fused_split":
            q = torch.cat(y.split(4, dim=-1), dim=-1).view(1, L, N, H).transpose(1, 2)
        elif case == "transpose_by_name":
            q = y.view(1, L, N, H).transpose(dim0=1, dim1=2)
        else:
            q = y.view(1, L, N, H).transpose(1, 2)
        if case == "per_head_scale":
            q = q * s
        if case == "mean_over_heads":
            q = q - q.mean(1, keepdim=True)
        if case == "slice_of_heads":
            q = torch.cat((q[:, :1], q[:, 1:]), dim=1)
        out = _site(q)
        return (out, q) if case == "read_elsewhere" else out

    gm, site = _graph(f, (1, L, 8), W, (1, N, 1, 1))
    site = next(n for n in gm.graph.nodes if n.target is torch.neg)
    with pytest.raises(_Refused, match=why):
        _chain(site.args[0], 1, 2, site)


def _inductor_forward(rank: int, world: int) -> str:
    import autosp
    from tests.distributed.models import build

    model, ids = build("llama"), _ids()
    backend = autosp.backend(compiler="inductor", split_projections=True, outputs="full")
    return inductor_code(lambda i: model(input_ids=i, labels=i, use_cache=False).loss, ids, backend=backend)


def test_inductor_makes_the_own_chunk_between_the_issue_and_the_wait():
    """In Inductor's forward code every exchange's issue is followed by the own chunk's three
    projections before its wait (without the fusion barriers the own q and k ran before it)."""
    from tests.distributed.harness import run_group

    for rank, code in enumerate(run_group(2, _inductor_forward, timeout=600)):
        lines = [ln.strip() for ln in code.splitlines()]
        splits = "[0, 512], [0, 512]" if rank == 0 else "[512, 0], [512, 0]"  # nothing to itself
        issues = [i for i, ln in enumerate(lines) if "all_to_all_single.default(" in ln and splits in ln]
        assert len(issues) == 2, [ln for ln in lines if "all_to_all_single" in ln]
        for i in issues:
            buf = lines[i].split(" = ")[0]
            wait = next(j for j in range(i, len(lines)) if lines[j].startswith("torch.ops._c10d_functional.wait_tensor")
                        and f"({buf})" in lines[j])
            assert sum("extern_kernels.mm(" in ln for ln in lines[i:wait]) == 3, lines[i:wait]
