"""``autosp::peer_exchange_start`` / ``autosp::peer_exchange_finish``: an all-to-all over dim 0
carried by the copy engines, for the GPUs of one host (``Config.exchange="peer_copy"``).

NCCL's all-to-all is a kernel: it needs SMs, and while a GEMM holds them it does not start
(measured on 2x H200: a median 34 us from issue to kernel start behind the GEMM queued after it,
6 us with nothing queued). Here no kernel moves the data. Each rank has a receive buffer in
symmetric memory (``_torch_private.PeerBuffers``: every rank's buffer mapped into every other's
address space); a rank writes its rows for rank j straight into j's buffer with a
device-to-device copy, which the copy engines carry over NVLink, and tells j with a flag written
by the stream itself (``stream_write_value32``: no kernel either). j's stream waits for the
flag (``stream_wait_value32``) and copies the rows out. All of it is queued at the start, on
a side stream (the "exchange stream"), so the compute stream only waits at the finish::

    start(x)   [the exchange stream, after the compute stream's work so far]
        out = empty (allocated on the compute stream, held by the exchange until finish)
        for each peer j:  wait until j has read what this rank put in the slot last time
                          copy x's rows for j into j's buffer, slot s, row block of this rank
                          write "ready (gen, site)" into j's flag for (s, this rank)
        out's own rows = x's own rows
        for each peer j:  wait until this rank's flag for (s, j) says "ready (gen, site)"
                          out's rows from j = this rank's buffer, slot s, row block j
                          write "read (gen)" into j's flag for (s, this rank)
    ... the compute stream runs on (the projections of this rank's own heads, weight gradients)
    finish(token, x) -> out   [the compute stream waits for the exchange stream's event]

``finish`` takes ``x`` too, so that the compiled graph keeps x alive until the exchange stream
has read it (and the exchange holds the tensor it read, a copy where x was strided, until the
finish, after which the compute stream is behind the exchange stream's reads). ``out`` is memory
Inductor does not see between start and finish. Both ops take ``x`` in the stride order of
its graph value (the tag; without one Inductor gives an op a pass inserted no layout constraint,
and lays ``x`` out as its producer suits), and the pass makes that value one contiguous buffer
of Inductor's, read by the start and held by the finish (a constraint alone would copy a value
not yet in a buffer once for each op), so that ``x.contiguous()`` here copies nothing.

Run it with ``CUDA_MODULE_LOADING=EAGER`` (the exchanger warns otherwise): under CUDA's lazy
loading the first launch of a kernel synchronizes the context, and a context with a stream
waiting for a peer's flag cannot synchronize until the peer has sent: the host stalls there in
the first steps (measured on one H200: blocked until the wait was met; not with EAGER).

A start whose finish never runs (an exception between them) leaves the exchange out of step:
the next finish raises, and the peers wait on the device for flags that do not come. A stream
wait has no timeout of its own, so a watchdog thread (``_Watchdog``) times the oldest exchange
not yet done from when the device reached it, and past ``Config.exchange_timeout_s`` it writes
what the exchange waits for (each peer's flag) and ends the process, as NCCL's watchdog ends a
rank whose collective does not complete: the host, once it synchronizes behind the wait, would
wait for ever, and the launcher sees the exit and ends the job.

The exchange stream is a stream of its own (``_torch_private.own_stream``), not one of torch's
pool of 32 (``torch.cuda.Stream``): work another part of the process put on the same pool stream
(a communicator's, a transfer's) would queue behind the flag waits.

Two slots alternate (a third exchange waits for the first's readers), so one exchange's copies
cross while the previous one's rows are read. The ready flag carries the exchange's site (its
place in the graph) beside the slot's generation, and the wait is for equality: ranks that ran
their exchanges in different orders hang here (as NCCL would), never read another exchange's
rows (unless two exchanges have the same place in two graphs). ``start``/``finish`` pairs must
finish in the order they started
(autosp/passes/peer_exchange.py checks the graph, and ``finish`` checks at run time).

Measured (2x H200, 16K tokens, the reference Llama shape, benchmarks/RESULTS.md, 2026-11-30
nineteenth session): exact, and no faster than NCCL in the training step (0.194 / 0.195 s against
0.194 / 0.194, alternated in one call). The all-to-all kernels are gone and the communication
with no compute beside it fell from 7.9 to 2.9 ms, but the device idled 2.3 ms more (the
compute stream waiting for the flags) and the gradient all-reduces' kernels, which share NVLink
with the copies, took 45 ms against 29. In the forward nothing is independent of an exchange
(with ``Config.split_projections`` too: 0.196 s), so a faster transfer is all it can give, and
the copies are not faster than NCCL's kernel at these sizes.

The receive buffers are sized by the graph (``capacity``: bytes of the largest row block any
rank sends or receives in it, the same on every rank), allocated at the first start and grown
(all ranks at the same start: the same graph) after a device synchronization and a barrier.
They live outside the caching allocator: ``peer_bytes()`` says how much (benchmarks add it to
the peak). Every rank of the group must be on this host, one GPU each.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import sys
import threading
import time
import warnings

import torch

from autosp._torch_private import (
    WAIT_EQ,
    WAIT_GEQ,
    PeerBuffers,
    lazy_module_loading,
    own_stream,
    resolve_group,
    stream_wait_value32,
    stream_write_value32,
)
from autosp.config import EXCHANGE_TIMEOUT_S

SLOTS = 2
LAZY_LOADING = (
    "exchange='peer_copy' with CUDA's lazy module loading (CUDA_MODULE_LOADING was not EAGER): loading a kernel "
    "for its first launch synchronizes the context, so the host waits there until every exchange in flight has "
    "landed, i.e. until the peers have sent (measured on one H200: a first launch behind a stream wait blocks "
    "until the wait is met; with EAGER, or the kernel loaded before, it does not). Ranks stall on each other in "
    "the first steps (whether they can deadlock there is not settled). Set CUDA_MODULE_LOADING=EAGER "
    "before CUDA starts (2.3 s more start-up and 0.6 GiB more device memory on H200, torch 2.11).")
SITE_BITS = 12  # the ready flag: generation << SITE_BITS | site
ALIGN = 1 << 16  # row blocks start on 64 KiB in the buffer


class _Watchdog:
    """Times the exchanges in flight on the device. The exchange stream runs them in order, so
    only the oldest not yet done can be waiting: its clock starts when the device has reached it
    (its ``entered`` event: the compute stream's work before the start and the exchanges before
    it are done) and ``overdue()`` says so once it has waited ``timeout`` seconds more. A thread
    (``start_thread``) asks every ``timeout / 20`` seconds (0.05 to 5) and hands the overdue
    exchange to ``on_overdue``. Events are anything with ``query()``; ``clock`` is
    ``time.monotonic`` unless a test gives another."""

    def __init__(self, timeout: float, clock=time.monotonic) -> None:
        self.timeout, self.clock = timeout, clock
        self.inflight: collections.deque = collections.deque()  # [what, entered, done, since]
        self.lock = threading.Lock()

    def watch(self, what, entered, done) -> None:
        with self.lock:
            self.inflight.append([what, entered, done, None])

    def overdue(self) -> tuple[object, float] | None:
        """(what, seconds waited) of the oldest exchange if it has waited past the timeout."""
        with self.lock:
            while self.inflight and self.inflight[0][2].query():
                self.inflight.popleft()
            if not self.inflight:
                return None
            head = self.inflight[0]
        if not head[1].query():
            return None
        now = self.clock()
        if head[3] is None:
            head[3] = now
        waited = now - head[3]
        return (head[0], waited) if waited > self.timeout else None

    def start_thread(self, device: torch.device, on_overdue) -> None:
        def run() -> None:
            torch.cuda.set_device(device)
            while True:
                time.sleep(min(max(self.timeout / 20, 0.05), 5.0))
                late = self.overdue()
                if late is not None:
                    on_overdue(*late)
                    return

        threading.Thread(target=run, name="autosp-peer-exchange-watchdog", daemon=True).start()


class _Exchanger:
    """One group's exchange state on this process's GPU: buffers, flags, the exchange stream, the
    count of exchanges so far, and the started exchanges not yet finished (in order)."""

    def __init__(self, group_name: str, device: torch.device, timeout: float) -> None:
        if lazy_module_loading():
            warnings.warn(LAZY_LOADING, stacklevel=2)
        group = resolve_group(group_name)
        self.group, self.group_name = group, group_name
        self.world, self.rank = group.size(), group.rank()
        self.device = device
        self.stream = own_stream(device)
        # flags: READY(s, src) then READ(s, dst), int32, zeroed on every rank before any is written
        self.flags = PeerBuffers(2 * SLOTS * self.world, torch.int32, device, group)
        self.flags.local.zero_()
        # what the watchdog reads the flags with while the exchange stream waits: made now, since
        # making them then may synchronize with the waiting stream
        self.watchdog = _Watchdog(timeout)
        self._probe_stream = own_stream(device)
        self._probe_host = torch.empty(self.flags.numel, dtype=torch.int32, pin_memory=True)
        self.watchdog.start_thread(device, lambda what, waited: _end(self.report(what, waited)))
        self._quiesce()
        self.data: PeerBuffers | None = None
        self.capacity = 0
        self.words: dict[tuple[int, int], torch.Tensor] = {}
        self.blocks: dict[tuple[int, int, int], torch.Tensor] = {}
        self.count = 0
        self.pending: collections.deque = collections.deque()

    def _quiesce(self) -> None:
        """Every rank's device is done with all it was given (a host-level meeting point)."""
        torch.cuda.synchronize(self.device)
        self.flags.barrier(0)
        torch.cuda.synchronize(self.device)

    def _ready(self, rank: int, slot: int, src: int) -> torch.Tensor:
        return self._word(rank, slot * self.world + src)

    def _read(self, rank: int, slot: int, dst: int) -> torch.Tensor:
        return self._word(rank, (SLOTS + slot) * self.world + dst)

    def _word(self, rank: int, index: int) -> torch.Tensor:
        word = self.words.get((rank, index))
        if word is None:  # the mapped views are made once (each costs the host a tensor)
            word = self.words[(rank, index)] = self.flags.remote(rank, index, 1)
        return word

    def _block(self, rank: int, slot: int, src: int) -> torch.Tensor:
        block = self.blocks.get((rank, slot, src))
        if block is None:
            block = self.blocks[(rank, slot, src)] = self.data.remote(
                rank, (slot * self.world + src) * self.capacity, self.capacity)
        return block

    def reserve(self, capacity: int) -> None:
        """Receive blocks of at least ``capacity`` bytes; every rank calls this at the same
        exchange with the same value (a collective: the buffers are mapped across ranks)."""
        capacity = -(-capacity // ALIGN) * ALIGN
        if capacity <= self.capacity:
            return
        self._quiesce()  # no copy into or out of the old buffers is in flight
        self.data, self.blocks = None, {}
        self.data = PeerBuffers(SLOTS * self.world * capacity, torch.uint8, self.device, self.group)
        self.capacity = capacity

    def start(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int], site: int) -> None:
        """Queue the whole exchange on the exchange stream: the sends, this rank's own rows, and
        the peers' rows copied out as each lands; ``finish`` only waits for it."""
        n, self.count = self.count, self.count + 1
        slot, gen = n % SLOTS, n // SLOTS + 1
        ready = ((gen << SITE_BITS) | (site & ((1 << SITE_BITS) - 1))) & 0xFFFFFFFF
        rows = _row_bytes(x)
        out = torch.empty((sum(out_splits), *x.shape[1:]), dtype=x.dtype, device=x.device)  # compute stream
        ob, xb = out.view(-1).view(torch.uint8), x.reshape(-1).view(torch.uint8)
        sent, at = _offsets(in_splits), _offsets(out_splits)
        compute, stream = torch.cuda.current_stream(self.device), self.stream
        stream.wait_stream(compute)  # x is made, out's memory is free
        with torch.cuda.stream(stream):
            entered = torch.cuda.Event()
            entered.record(stream)
            for step in range(1, self.world):
                j = (self.rank + step) % self.world
                if gen > 1:  # j has read what this rank put in this slot last time
                    stream_wait_value32(stream, self._read(self.rank, slot, j), gen - 1, WAIT_GEQ)
                nbytes = in_splits[j] * rows
                if nbytes:
                    self._block(j, slot, self.rank)[:nbytes].copy_(xb[sent[j] * rows: sent[j] * rows + nbytes])
                stream_write_value32(stream, self._ready(j, slot, self.rank), ready)
            own = out_splits[self.rank] * rows
            if own:
                ob[at[self.rank] * rows: at[self.rank] * rows + own].copy_(
                    xb[sent[self.rank] * rows: sent[self.rank] * rows + own])
            for step in range(1, self.world):
                j = (self.rank - step) % self.world
                stream_wait_value32(stream, self._ready(self.rank, slot, j), ready, WAIT_EQ)
                nbytes = out_splits[j] * rows
                if nbytes:
                    ob[at[j] * rows: at[j] * rows + nbytes].copy_(self._block(self.rank, slot, j)[:nbytes])
                stream_write_value32(stream, self._read(j, slot, self.rank), gen)
            done = torch.cuda.Event()
            done.record(stream)
        self.pending.append((site, out, done, x))  # x held until finish: the exchange stream reads it
        self.watchdog.watch((n, site, slot, gen, ready), entered, done)

    def report(self, what, waited: float) -> str:
        """What an overdue exchange waits for: each peer's flags as this rank's memory holds them."""
        n, site, slot, gen, ready = what
        lines = [f"autosp peer exchange: rank {self.rank} of group {self.group_name!r} ({self.world} ranks) has waited "
                 f"{waited:.0f} s on the device (Config.exchange_timeout_s {self.watchdog.timeout:g}) for exchange "
                 f"#{n} (site {site}, slot {slot}, generation {gen}); a peer has failed or left the step. "
                 "Ending this process (exit 1), as NCCL's watchdog would."]
        flags = self._read_flags()
        if flags is None:
            lines.append("The flags could not be read (the device did not answer in 10 s).")
        else:
            for step in range(1, self.world):
                j = (self.rank - step) % self.world
                got = flags[slot * self.world + j] & 0xFFFFFFFF
                if gen > 1:
                    lines.append(f"  rank {j}: read flag {flags[(SLOTS + slot) * self.world + j]} (>= {gen - 1} lets "
                                 "this rank send)")
                lines.append(f"  rank {j}: ready flag generation {got >> SITE_BITS} site {got & ((1 << SITE_BITS) - 1)}"
                             f" (waited for generation {gen} site {ready & ((1 << SITE_BITS) - 1)})"
                             + ("" if got == ready else ": not sent"))
        return "\n".join(lines)

    def _read_flags(self) -> list[int] | None:
        """This rank's flags, copied on a stream of their own (the exchange stream is waiting)."""
        with torch.cuda.stream(self._probe_stream):
            self._probe_host.copy_(self.flags.local, non_blocking=True)
            read = torch.cuda.Event()
            read.record(self._probe_stream)
        for _ in range(1000):
            if read.query():
                return self._probe_host.tolist()
            time.sleep(0.01)
        return None

    def finish(self, site: int) -> torch.Tensor:
        if not self.pending or self.pending[0][0] != site:
            raise RuntimeError(f"peer exchange: site {site} finished, but the oldest exchange in flight is "
                               f"{self.pending[0][0] if self.pending else None}: exchanges must finish in the "
                               "order they started")
        _, out, done, _ = self.pending.popleft()
        # after this wait the exchange stream's reads of x and writes of out are behind the
        # compute stream's next work: out is returned (and later freed) on the compute stream
        torch.cuda.current_stream(self.device).wait_event(done)
        return out


def _end(message: str) -> None:
    """The watchdog's end of the process: the host may be blocked behind the wait for ever."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(1)


_EXCHANGERS: dict[tuple[str, int], _Exchanger] = {}


def _exchanger(group_name: str, device: torch.device, timeout: float | None = None) -> _Exchanger:
    key = (group_name, device.index if device.index is not None else torch.cuda.current_device())
    ex = _EXCHANGERS.get(key)
    if ex is None:
        ex = _EXCHANGERS[key] = _Exchanger(group_name, torch.device("cuda", key[1]), timeout or EXCHANGE_TIMEOUT_S)
    elif timeout is not None:
        ex.watchdog.timeout = timeout  # the latest graph's
    return ex


def peer_bytes() -> int:
    """Device bytes this process's exchanges hold outside the caching allocator."""
    return sum(e.flags.nbytes + (e.data.nbytes if e.data is not None else 0) for e in _EXCHANGERS.values())


def _row_bytes(x: torch.Tensor) -> int:
    return math.prod(x.shape[1:]) * x.element_size()


def _offsets(splits: list[int]) -> list[int]:
    return [0, *itertools.accumulate(splits)][:-1]


def _check(x: torch.Tensor, out_splits: list[int], in_splits: list[int], world: int) -> None:
    if x.device.type != "cuda":
        raise ValueError(f"peer exchange: the copy engines move CUDA tensors; got one on {x.device}")
    if len(out_splits) != world or len(in_splits) != world or sum(in_splits) != x.shape[0]:
        raise ValueError(f"peer exchange: splits {in_splits} -> {out_splits} do not fit {world} ranks and "
                         f"{x.shape[0]} rows")


@torch.library.custom_op("autosp::peer_exchange_start", mutates_args=(),
                         tags=(torch.Tag.needs_fixed_stride_order,))
def peer_exchange_start(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group_name: str, site: int,
                        capacity: int, timeout: float) -> torch.Tensor:
    """Send ``x``'s rows (``in_splits[j]`` of them to rank j, in rank order) on the exchange
    stream; returns an empty token for :func:`peer_exchange_finish` (which takes ``x`` too).
    ``timeout``: the seconds the watchdog lets an exchange wait for its peers on the device."""
    if not timeout > 0:
        raise ValueError(f"peer exchange: timeout must be > 0 seconds, got {timeout}")
    ex = _exchanger(group_name, x.device, timeout)
    _check(x, out_splits, in_splits, ex.world)
    needed = max(max(out_splits), max(in_splits)) * _row_bytes(x)
    if needed > capacity:
        raise ValueError(f"peer exchange: a row block of {needed} bytes is over the graph's capacity {capacity}")
    ex.reserve(capacity)
    ex.start(x.contiguous(), list(out_splits), list(in_splits), site)  # a strided x: copied, held until finish
    return x.new_empty(0)


@peer_exchange_start.register_fake
def _(x, out_splits, in_splits, group_name, site, capacity, timeout):
    return x.new_empty(0)


@torch.library.custom_op("autosp::peer_exchange_finish", mutates_args=(),
                         tags=(torch.Tag.needs_fixed_stride_order,))
def peer_exchange_finish(token: torch.Tensor, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                         group_name: str, site: int) -> torch.Tensor:
    """The rows every rank sent this one (``out_splits[j]`` from rank j, in rank order), once
    they have landed; the compute stream then also waits for this rank's own sends of ``x``."""
    return _exchanger(group_name, x.device).finish(site)


@peer_exchange_finish.register_fake
def _(token, x, out_splits, in_splits, group_name, site):
    return x.new_empty((sum(out_splits), *x.shape[1:]))
