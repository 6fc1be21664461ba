"""The copy engines' all-to-all (autosp/kernels/peer_exchange.py) against NCCL's, on 2 GPUs:
equal splits, the head split's (nothing to itself), a strided x, several exchanges in flight, the slots
reused many times with sizes that change, the buffers grown, and work queued between start and
finish. Whole models with it: the ``exchange`` cases of test_parity_nccl.py."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_group


def _exchanges(rank: int, world: int) -> dict:
    import torch.distributed as dist

    import autosp.kernels.peer_exchange as pe

    group = dist.group.WORLD.group_name
    start, finish = torch.ops.autosp.peer_exchange_start, torch.ops.autosp.peer_exchange_finish
    gen = torch.Generator(device="cuda").manual_seed(1234 + rank)
    bad: list[str] = []

    def nccl(x, out_splits, in_splits):
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits)
        return out

    def case(name, rows, cols, out_splits, in_splits, capacity, dtype=torch.bfloat16):
        x = torch.randn(rows, cols, generator=gen, device="cuda").to(dtype)
        return name, x, out_splits, in_splits, capacity

    site = 0
    equal = lambda r: ([r] * world, [r] * world)  # noqa: E731
    head = lambda r: ([0 if j == rank else r for j in range(world)],) * 2  # noqa: E731
    small, large = 1 << 20, 1 << 24
    rounds = [
        [case("equal", 64, 96, *equal(32), small)],
        [case("head split", 64, 40, *head(64), small)],
        # a strided x (Inductor hands the output all-to-all a transposed view): copied, held until finish
        [(lambda n, x, *r: (n, x.t().contiguous().t(), *r))(*case("strided", 64, 24, *equal(32), small))],
        # three in flight: a start waits for the reads of the exchange two before it
        [case("inflight a", 32, 8, *equal(16), small), case("inflight b", 96, 8, *equal(48), small),
         case("inflight c", 16, 8, *equal(8), small)],
        # the buffers grown (every rank at the same exchange), float32 rows
        [case("grown", 4096, 512, *equal(2048), large, dtype=torch.float32)],
    ]
    rounds += [[case(f"cycle {i}", 8 + 8 * (i % 5), 24, *equal(4 + 4 * (i % 5)), large)] for i in range(40)]
    for exchanges in rounds:
        tokens = []
        for _, x, out_splits, in_splits, capacity in exchanges:
            tokens.append(start(x, out_splits, in_splits, group, site, capacity, 600.0))
            site += 1
        busy = torch.randn(2048, 2048, device="cuda")
        busy = busy @ busy  # compute queued while the copies cross
        first = site - len(exchanges)
        for i, (t, (name, x, out_splits, in_splits, _)) in enumerate(zip(tokens, exchanges, strict=True)):
            got = finish(t, x, out_splits, in_splits, group, first + i)
            want = nccl(x, out_splits, in_splits)
            if not torch.equal(got, want):
                bad.append(f"{name}: {(got.float() - want.float()).abs().max().item()}")
    torch.cuda.synchronize()
    try:  # out of order: loud
        t1 = start(torch.ones(4, 2, device="cuda"), [2, 2], [2, 2], group, 9000, small, 600.0)
        t2 = start(torch.ones(4, 2, device="cuda"), [2, 2], [2, 2], group, 9001, small, 600.0)
        finish(t2, torch.ones(4, 2, device="cuda"), [2, 2], [2, 2], group, 9001)
        refused = ""
    except RuntimeError as e:
        refused = str(e)
        finish(t1, torch.ones(4, 2, device="cuda"), [2, 2], [2, 2], group, 9000)
        finish(t2, torch.ones(4, 2, device="cuda"), [2, 2], [2, 2], group, 9001)
    torch.cuda.synchronize()
    return {"bad": bad, "refused": refused, "peer_bytes": pe.peer_bytes()}


@pytest.mark.multigpu
def test_the_copy_engines_exchange_equals_ncclss_all_to_all(monkeypatch):
    monkeypatch.setenv("CUDA_MODULE_LOADING", "EAGER")  # as the exchanger asks (the spawned ranks inherit it)
    outs = run_group(2, _exchanges, timeout=300, backend="nccl")
    for rank, out in enumerate(outs):
        assert out["bad"] == [], (rank, out["bad"])
        assert "order" in out["refused"], out["refused"]
        assert out["peer_bytes"] >= 2 * 2 * (1 << 24)  # two slots x two row blocks (one a rank) of the grown size


def _abandoned(rank: int, world: int) -> list[str]:
    """Rank 1 leaves after one exchange; rank 0 starts a second. Its watchdog reports the wait
    (``_end`` replaced: the report kept, the awaited flag written here instead of exiting)."""
    import threading

    import torch.distributed as dist

    import autosp.kernels.peer_exchange as pe
    from autosp import _torch_private as tp

    group = dist.group.WORLD.group_name
    start, finish = torch.ops.autosp.peer_exchange_start, torch.ops.autosp.peer_exchange_finish
    x = torch.full((8, 4), float(rank), device="cuda")
    args = ([4, 4], [4, 4], group)
    dist.barrier()
    got = finish(start(x, *args, 0, 1 << 20, 3.0), x, *args, 0)
    torch.cuda.synchronize()
    assert got[4 * (1 - rank):][:4].eq(1 - rank).all()
    reports: list[str] = []
    if rank == 0:
        released = threading.Event()
        ex = pe._EXCHANGERS[(group, torch.cuda.current_device())]

        def end(message: str) -> None:
            reports.append(message)
            ready = 1 << pe.SITE_BITS | 1  # generation 1, site 1
            tp.stream_write_value32(tp.own_stream(ex.device), ex._ready(0, 1, 1), ready)
            released.set()

        pe._end = end
        token = start(x, *args, 1, 1 << 20, 3.0)  # exchange #1: slot 1, generation 1; rank 1 never sends
        assert released.wait(120), "the watchdog did not fire"
        finish(token, x, *args, 1)
        torch.cuda.synchronize()
    dist.barrier()
    return reports


@pytest.mark.multigpu
def test_an_exchange_a_peer_left_is_reported_by_the_watchdog(monkeypatch):
    monkeypatch.setenv("CUDA_MODULE_LOADING", "EAGER")
    reports = run_group(2, _abandoned, timeout=300, backend="nccl")
    assert reports[1] == [] and len(reports[0]) == 1, reports
    report = reports[0][0]
    assert "has waited" in report and "exchange #1 (site 1, slot 1, generation 1)" in report, report
    assert "rank 1: ready flag generation 0 site 0 (waited for generation 1 site 1): not sent" in report, report
