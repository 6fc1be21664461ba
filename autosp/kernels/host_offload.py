"""Host offload of saved activations: two ``torch.library`` ops the offload pass inserts.

    h = offload(x)                        forward: x (device) -> h, a pinned host copy
    x = reload(h, device, prefetch=[...]) backward: h -> x on ``device``; starts copying the
                                          ``prefetch`` host tensors to the device, for later reloads

Both copies run on one side stream per device (the transfer stream), so the compute stream
never waits on a device-to-host copy, and host-to-device copies of the next layer overlap the
backward of this one:

* ``offload`` makes the transfer stream wait for the compute stream (x is ready), copies x into
  a pinned buffer there (``non_blocking``), and tells the caching allocator that x is in use on
  the transfer stream (``record_stream``), so x's memory is not handed out again before the
  copy has read it. (The allocator's promise only: a compiler that hands x's memory to a
  later buffer itself, as Inductor's buffer reuse does, must not do so in a graph that calls
  ``offload``; ``passes/offload.py`` compiles such graphs without it.) The host buffers come
  from ``pinned_pool.POOL``: blocks of the size asked
  for (torch's caching host allocator would round them up to a power of two), reused from step
  to step; every copy into or out of them runs on the transfer stream, which orders a block's
  next use after its last.
* ``reload`` with ``prefetch`` allocates the device buffers on the compute stream, makes the
  transfer stream wait for it (the memory may have just been freed there), queues the copies
  and records an event; the buffers wait in :data:`_IN_FLIGHT` (an :class:`InFlight`) keyed by the host tensor.
  ``reload(h)`` takes h's buffer from there, makes the compute stream wait for its event and
  returns it; when h was not prefetched it copies now (transfer stream, then the same wait).
  Copies on one stream run in order, so a reload never reads a host buffer before its
  offload has filled it. An entry of the table dies with its host tensor (an abandoned
  backward leaves nothing behind).

The ops are functional (a fresh tensor out, nothing mutated), so Inductor schedules them as
ordinary calls. On a CPU tensor both are plain copies (tests exercise the graph rewrite on
CPU). ``in_flight()`` says how many prefetched buffers wait to be used: 0 after a complete
backward (tests check it over many steps).
"""

from __future__ import annotations

import weakref

import torch

from autosp.kernels.pinned_pool import POOL


class InFlight:
    """Copies started by a prefetch and not yet taken by their reload, keyed by the host tensor's
    address. Filled and emptied within one backward, like c10d's table of pending collective
    work. An entry lives no longer than its host tensor: when a backward is abandoned (an
    exception in it, a graph freed before its backward ran to the end) the saved host tensors
    die and their entries, with the device buffers, go with them. Until then no other tensor can
    have the address. The pinned block itself is handed out again only for copies queued after
    its last one on the same transfer stream (``pinned_pool``)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[object, weakref.finalize]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def start(self, h: torch.Tensor, begin) -> None:
        """Start ``begin(h)`` (the copy: returns what :meth:`take` gives back) unless started."""
        key = h.data_ptr()
        if key not in self._entries:
            self._entries[key] = (begin(h), weakref.finalize(h, self._entries.pop, key, None))

    def take(self, h: torch.Tensor):
        """What ``start`` began for h, now no longer in the table; None if nothing was."""
        entry = self._entries.pop(h.data_ptr(), None)
        if entry is None:
            return None
        copy, finalizer = entry
        finalizer.detach()
        return copy


# The one piece of runtime state: the prefetches of the backward now running.
_IN_FLIGHT = InFlight()
_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def in_flight() -> int:
    """Prefetched device buffers not yet taken by a reload (0 between steps)."""
    return len(_IN_FLIGHT)


def _transfer_stream(device: torch.device) -> torch.cuda.Stream:
    """The device's one transfer stream (``cuda`` and ``cuda:N`` for the current N are one
    device: every copy into or out of a pinned block must queue on the same stream)."""
    if device.type != "cuda":
        raise NotImplementedError(f"autosp host offload supports CUDA devices and the CPU, not {device.type!r}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device=device)
    return _STREAMS[device]


def is_dense(x: torch.Tensor) -> bool:
    """Whether x covers its memory exactly once (any order of dims): it can be copied as is."""
    dims = sorted((s, n) for s, n in zip(x.stride(), x.shape, strict=True) if n != 1)
    expect = 1
    for stride, size in dims:
        if stride != expect:
            return False
        expect *= size
    return True


@torch.library.custom_op("autosp::offload", mutates_args=())
def offload(x: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of ``x`` (same shape and strides), filled asynchronously."""
    if not is_dense(x):
        raise ValueError(f"autosp::offload: tensor of shape {list(x.shape)} and strides {list(x.stride())} "
                         "does not cover its memory exactly once")
    if x.device.type == "cpu":
        return x.clone()
    return _start_host_copy(x, x.stride())


@offload.register_fake
def _(x):
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="cpu")


def to_host(x: torch.Tensor) -> torch.Tensor:
    """A contiguous pinned host copy of ``x`` (any strides: a chunk of a larger tensor), filled
    asynchronously on the transfer stream; a plain function for kernels that return their own
    host copies (chunked attention). A fresh contiguous copy on the CPU."""
    if x.device.type == "cpu":
        return x.clone(memory_format=torch.contiguous_format)
    return _start_host_copy(x, _contiguous_strides(x.shape))


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _start_host_copy(x: torch.Tensor, stride) -> torch.Tensor:
    """A pinned host tensor of ``x``'s shape with ``stride`` (from the pool, keyed by the
    transfer stream), filled from device ``x`` on the transfer stream once the compute stream
    has made x; x's memory is not reused before the copy has read it (``record_stream``)."""
    transfer = _transfer_stream(x.device)
    h = POOL.empty_strided(x.shape, stride, x.dtype, transfer)
    transfer.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(transfer):  # a strided x is gathered here, on the transfer stream
        h.copy_(x if h.stride() == x.stride() else x.contiguous(), non_blocking=True)
    x.record_stream(transfer)
    return h


@torch.library.custom_op("autosp::reload", mutates_args=())
def reload(h: torch.Tensor, device: torch.device, prefetch: list[torch.Tensor]) -> torch.Tensor:
    """``h`` on ``device``; the copies of ``prefetch`` to ``device`` start now, for later reloads."""
    device = torch.device(device)
    if device.type == "cpu":
        return h.clone()
    for p in prefetch:
        _IN_FLIGHT.start(p, lambda p: _start_copy(p, device))
    x, done = _IN_FLIGHT.take(h) or _start_copy(h, device)
    torch.cuda.current_stream(device).wait_event(done)
    return x


@reload.register_fake
def _(h, device, prefetch):
    return torch.empty_strided(h.shape, h.stride(), dtype=h.dtype, device=device)


def _start_copy(h: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event]:
    transfer = _transfer_stream(device)
    x = torch.empty_strided(h.shape, h.stride(), dtype=h.dtype, device=device)  # on the compute stream
    transfer.wait_stream(torch.cuda.current_stream(device))
    done = torch.cuda.Event()
    with torch.cuda.stream(transfer):
        x.copy_(h, non_blocking=True)
        done.record(transfer)
    # Not x.record_stream(transfer): every reloaded buffer would then wait, when freed, for the
    # transfer stream's later prefetches before its memory is reused (a higher peak where copies
    # lag). The one case it would guard is left open: a prefetch abandoned by a failed backward
    # frees its buffer on the compute stream while the copy into it may still run.
    return x, done
