"""The peer exchange's watchdog (autosp/kernels/peer_exchange.py): a stream wait has no timeout
of its own, so a thread times the oldest exchange not yet done from when the device reached it,
and past the timeout the process says what it waits for and exits 1. The clock and the events
are the test's on the CPU; on a GPU, a real stream waiting on a flag nobody writes. The whole
exchanger, with a peer that leaves: tests/distributed/test_peer_exchange_nccl.py (2 GPUs)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from autosp.kernels.peer_exchange import _end, _Watchdog


class _Ev:
    def __init__(self, done: bool = False) -> None:
        self.done = done

    def query(self) -> bool:
        return self.done


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_clock_starts_when_the_device_reaches_the_exchange_and_stops_when_it_is_done():
    clock = _Clock()
    dog = _Watchdog(10.0, clock)
    first = (_Ev(), _Ev())  # entered, done
    second = (_Ev(), _Ev())
    dog.watch("first", *first)
    dog.watch("second", *second)
    clock.now += 1000
    assert dog.overdue() is None  # queued, not reached: the compute before it may be long
    first[0].done = True
    assert dog.overdue() is None  # reached now: the clock starts here
    clock.now += 9.5
    assert dog.overdue() is None
    clock.now += 1.0
    assert dog.overdue() == ("first", 10.5)
    first[1].done = True  # it ended: the next is timed from when it is reached
    second[0].done = True
    assert dog.overdue() is None
    clock.now += 10.5
    assert dog.overdue() == ("second", 10.5)
    second[1].done = True
    assert dog.overdue() is None and not dog.inflight


def test_exchanges_done_leave_the_watch():
    dog = _Watchdog(1.0, _Clock())
    for i in range(5):
        dog.watch(i, _Ev(True), _Ev(True))
    assert dog.overdue() is None and not dog.inflight


def test_the_end_says_why_and_exits_1():
    code = "from autosp.kernels.peer_exchange import _end; _end('exchange #3 waited'); print('not reached')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "exchange #3 waited" in out.stderr and "not reached" not in out.stdout
    assert callable(_end)


@pytest.mark.gpu
def test_a_stream_waiting_on_a_flag_nobody_writes_is_reported_and_released():
    """A real stream of its own waits for a flag; the thread reports it past the timeout; the
    flag is then written by another stream (no kernel) and the wait ends."""
    from autosp import _torch_private as tp

    device = torch.device("cuda", torch.cuda.current_device())
    stream, other = tp.own_stream(device), tp.own_stream(device)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    torch.cuda.synchronize()
    entered, done = torch.cuda.Event(), torch.cuda.Event()
    entered.record(stream)
    tp.stream_wait_value32(stream, flag, 1, tp.WAIT_EQ)
    done.record(stream)
    dog = _Watchdog(0.5)
    dog.watch("the exchange", entered, done)
    late, fired = [], threading.Event()
    dog.start_thread(device, lambda what, waited: (late.append((what, waited)), fired.set()))
    assert fired.wait(30), "the watchdog did not fire"
    assert late[0][0] == "the exchange" and late[0][1] > 0.5 and not done.query()
    tp.stream_write_value32(other, flag, 1)
    done.synchronize()
    assert dog.overdue() is None and not dog.inflight


@pytest.mark.gpu
def test_own_stream_is_none_of_torchs_pool_streams():
    from autosp import _torch_private as tp

    device = torch.device("cuda", torch.cuda.current_device())
    own = tp.own_stream(device)
    pool = {torch.cuda.Stream(device).cuda_stream for _ in range(80)}
    pool |= {torch.cuda.Stream(device, priority=-1).cuda_stream for _ in range(80)}
    assert own.cuda_stream not in pool and own.cuda_stream != torch.cuda.current_stream(device).cuda_stream
    x = torch.arange(1 << 20, device=device)
    own.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(own):
        y = x * 2
    torch.cuda.current_stream(device).wait_stream(own)
    assert torch.equal(y, torch.arange(1 << 20, device=device) * 2)
