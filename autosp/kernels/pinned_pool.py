"""Pinned host memory for the offload, in blocks of the size asked for (to the page).

Why not ``torch.empty(..., pin_memory=True)``: torch's caching host allocator rounds every
block up to a power of two. A saved activation of 8.2 GiB (a layer's input at 4.3M tokens, SP=2,
hidden 2048, bf16) takes a 16 GiB block there, and the host, not the GPU, then caps the
sequence length. The pool hands out exactly what a tensor needs (rounded to a 4 KiB page):

    h = POOL.empty_strided(shape, stride, dtype, stream)   # pinned, exact size; copies on stream

How: a block is plain host memory (a CPU tensor, page-aligned inside it) that the pool pins
once with ``cudaHostRegister`` (``torch.cuda.cudart()``) and keeps. A tensor handed out is a
view of it through a small ``ctypes`` buffer of its own (``torch.frombuffer``), so the tensor's
storage, not any one Python object, decides when the block is free: the storage dies with its
last alias (an output reinterpreted by Inductor, a saved tensor in autograd), the buffer with
it, and a finalizer returns the block to the free list of its size. Shapes repeat from step to
step, so after the first step every request is met from the free list (a free block serves a
request up to 1/``SLACK`` smaller): no pinning on the hot path, host memory flat. A request no
free block fits (the first step, or new shapes) unpins that stream's free blocks before it pins
a new one, so shapes that change do not pile up pinned memory (they pay the pinning again).

When a block may be handed out again: every copy into or out of pool memory runs on one
transfer stream per device (``host_offload``), and the host never reads or writes it. A block
freed after its tensor's last copy was *queued* is safe to reuse for a copy queued later on the
same stream: the stream runs them in order. So free lists are per ``stream`` (the transfer
stream the tensor's copies run on), and a block never moves between streams. Unpinning is the
exception: a freed block's last copy may still be running, so the pool records an event on its
stream when the block comes back, and :meth:`PinnedPool.release` waits for it before it unpins.

``stats()`` says what is pinned (``reserved``), what is handed out (``in_use``) and the peak of
each; ``release()`` unpins and frees the blocks in the free lists (``autosp.release_host_memory``).
"""

from __future__ import annotations

import collections
import ctypes
import math
import mmap
import threading
import weakref
from collections.abc import Callable, Hashable

import torch

PAGE = mmap.PAGESIZE  # blocks are whole pages: no page is shared with another block
SLACK = 8  # a free block serves a request up to 1/SLACK smaller than itself


def block_bytes(nbytes: int) -> int:
    """The pinned bytes a tensor of ``nbytes`` takes in the pool: rounded up to a page (a
    block reused for a smaller tensor may be up to 1/``SLACK`` larger)."""
    return 0 if nbytes <= 0 else -(-nbytes // PAGE) * PAGE


def _cuda_register(ptr: int, size: int) -> None:
    cudart = torch.cuda.cudart()
    torch.cuda.check_error(cudart.cudaHostRegister(ptr, size, 1))  # 1: cudaHostRegisterPortable


def _cuda_unregister(ptr: int) -> None:
    torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(ptr))


def _cuda_fence(stream: torch.cuda.Stream) -> torch.cuda.Event:
    """An event after the work queued on ``stream`` so far (the block's last copy among it)."""
    return stream.record_event()


class _Block:
    """One pinned region: ``size`` bytes at ``ptr``, inside ``owner`` (the memory's owner);
    ``done``: when free, what to wait for before unpinning (its copies' stream's event)."""

    __slots__ = ("done", "owner", "ptr", "size")

    def __init__(self, owner: torch.Tensor, ptr: int, size: int) -> None:
        self.owner, self.ptr, self.size, self.done = owner, ptr, size, None


class PinnedPool:
    """Pinned host blocks of the size asked for, reused by size and stream; see the module
    docstring.

    ``register``/``unregister`` pin and unpin a range, ``fence(stream)`` returns something whose
    ``synchronize()`` waits for the work queued on the stream so far (CUDA's by default; tests
    pass their own to check the bookkeeping on a machine without a GPU).

    Locking: a block comes back from a finalizer, which runs wherever the tensor's storage dies,
    including inside a garbage collection triggered by an allocation on a thread that holds the
    pool's lock. So giving back takes no lock: it appends to ``_returned`` (a deque: appends are
    atomic), and whoever takes the lock next moves the returned blocks to the free lists."""

    def __init__(self, register: Callable[[int, int], None] = _cuda_register,
                 unregister: Callable[[int], None] = _cuda_unregister,
                 fence: Callable[[Hashable], object] = _cuda_fence) -> None:
        self._register, self._unregister, self._fence = register, unregister, fence
        self._lock = threading.Lock()
        self._returned: collections.deque[tuple[Hashable, _Block]] = collections.deque()
        self._free: dict[Hashable, dict[int, list[_Block]]] = {}  # stream -> size -> free blocks
        self._blocks: dict[int, _Block] = {}  # ptr -> block, every block the pool has pinned
        self._reserved = self._in_use = self._peak_reserved = self._peak_in_use = 0

    def empty_strided(self, shape, stride, dtype: torch.dtype, stream: Hashable) -> torch.Tensor:
        """A pinned host tensor of ``shape`` and ``stride`` covering its memory exactly once (the
        caller checks that), whose copies all run on ``stream``. Its contents are undefined until
        a copy fills it."""
        nbytes = math.prod(shape) * dtype.itemsize
        block = self._take(stream, block_bytes(max(nbytes, 1)))
        try:
            view = (ctypes.c_char * max(nbytes, 1)).from_address(block.ptr)
            flat = torch.frombuffer(view, dtype=torch.uint8)[:nbytes]
            out = flat.view(dtype).as_strided(tuple(shape), tuple(stride))
        except BaseException:
            self._give_back(stream, block)
            raise
        weakref.finalize(view, self._give_back, stream, block).atexit = False
        return out

    def _take(self, stream: Hashable, size: int) -> _Block:
        with self._lock:
            self._drain()
            block = self._best_fit(stream, size)
            if block is not None:
                self._count_in_use(block.size)
                return block
        # No free block fits: the first step, or shapes that changed. This stream's free blocks
        # are of sizes this step has not asked for; unpin them before pinning more, so that
        # changing shapes do not pile up pinned memory.
        self._release(stream)
        block = self._new_block(size)
        with self._lock:
            self._count_in_use(block.size)
        return block

    def _best_fit(self, stream: Hashable, size: int) -> _Block | None:
        """The smallest free block of ``stream`` that holds ``size`` bytes and is at most 1/SLACK
        larger (the same size from step to step; a slightly shorter batch reuses a longer
        one's). Caller holds the lock."""
        by_size = self._free.get(stream, {})
        fits = [s for s, blocks in by_size.items() if size <= s <= size + size // SLACK and blocks]
        return by_size[min(fits)].pop() if fits else None

    def _count_in_use(self, size: int) -> None:
        self._in_use += size
        self._peak_in_use = max(self._peak_in_use, self._in_use)

    def _drain(self) -> None:
        """Move the blocks given back since the last call to the free lists. Caller holds the lock."""
        while self._returned:
            stream, block = self._returned.popleft()
            self._in_use -= block.size
            self._free.setdefault(stream, {}).setdefault(block.size, []).append(block)

    def _new_block(self, size: int) -> _Block:
        owner = torch.empty(size + PAGE, dtype=torch.uint8)
        ptr = owner.data_ptr() + (-owner.data_ptr()) % PAGE  # whole pages: none shared with another block
        self._register(ptr, size)
        block = _Block(owner, ptr, size)
        with self._lock:
            self._blocks[ptr] = block
            self._reserved += size
            self._peak_reserved = max(self._peak_reserved, self._reserved)
        return block

    def _give_back(self, stream: Hashable, block: _Block) -> None:
        """A tensor's storage died (a finalizer: no lock here, see the class docstring)."""
        try:
            block.done = self._fence(stream)
        except Exception:  # noqa: BLE001 - never lose the block; release() then waits for the whole device
            block.done = None
        self._returned.append((stream, block))

    def release(self) -> int:
        """Unpin and free every block not in use; returns the bytes released."""
        return self._release(None)

    def _release(self, stream: Hashable | None) -> int:
        """Unpin the free blocks of ``stream`` (None: of every stream), each once the work queued
        on its stream when it came back is done; returns the bytes released."""
        with self._lock:
            self._drain()
            keys = list(self._free) if stream is None else [stream] if stream in self._free else []
            blocks = [(k, b) for k in keys for free in self._free.pop(k).values() for b in free]
            for _, b in blocks:
                del self._blocks[b.ptr]
                self._reserved -= b.size
        released = 0
        for i, (_, b) in enumerate(blocks):
            try:
                if b.done is not None:
                    b.done.synchronize()  # its last copy may still be running
                elif torch.cuda.is_initialized():
                    torch.cuda.synchronize()
                self._unregister(b.ptr)
            except BaseException:
                self._keep(blocks[i:])  # still pinned: back in the books, not freed while registered
                raise
            released += b.size
        return released

    def _keep(self, blocks: list[tuple[Hashable, _Block]]) -> None:
        with self._lock:
            for stream, b in blocks:
                self._blocks[b.ptr] = b
                self._reserved += b.size
                self._free.setdefault(stream, {}).setdefault(b.size, []).append(b)

    def stats(self) -> dict[str, int]:
        """Pinned bytes: ``reserved`` (pinned by the pool), ``in_use`` (the blocks saved tensors
        hold: whole blocks, which may be up to 1/SLACK larger than the tensors), and the peak of
        each since the last :meth:`reset_peaks`."""
        with self._lock:
            self._drain()
            return {"reserved": self._reserved, "in_use": self._in_use,
                    "peak_reserved": self._peak_reserved, "peak_in_use": self._peak_in_use}

    def reset_peaks(self) -> None:
        with self._lock:
            self._drain()
            self._peak_reserved, self._peak_in_use = self._reserved, self._in_use


# The process's pool, as torch's caching host allocator is the process's: the offload's saved
# tensors outlive any one call, and blocks are shared by every compiled region of the process.
POOL = PinnedPool()
