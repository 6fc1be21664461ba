"""Pinned host memory for the offload, in blocks of the size asked for (to the page).

Why not ``torch.empty(..., pin_memory=True)``: torch's caching host allocator rounds every
block up to a power of two. A saved activation of 8.2 GiB (a layer's input at 4.3M tokens, SP=2,
hidden 2048, bf16) takes a 16 GiB block there, and the host, not the GPU, then caps the
sequence length. The pool hands out exactly what a tensor needs (rounded to a 4 KiB page):

    h = POOL.empty_strided(shape, stride, dtype, stream_key)   # pinned, exact size

How: a block is plain host memory (a CPU tensor, page-aligned inside it) that the pool pins
once with ``cudaHostRegister`` (``torch.cuda.cudart()``) and keeps. A tensor handed out is a
view of it through a small ``ctypes`` buffer of its own (``torch.frombuffer``), so the tensor's
storage, not any one Python object, decides when the block is free: the storage dies with its
last alias (an output reinterpreted by Inductor, a saved tensor in autograd), the buffer with
it, and a finalizer returns the block to the free list of its size. Shapes repeat from step to
step, so after the first step every request is met from the free list: no pinning, no
allocation on the hot path, host memory flat.

When a block may be handed out again: every copy into or out of pool memory runs on one
transfer stream per device (``host_offload``), and the host never reads or writes it. A block
freed after its tensor's last copy was *queued* is safe to reuse for a copy queued later on the
same stream: the stream runs them in order. So free lists are per ``stream_key`` (the device),
and a block never moves between devices' streams.

``stats()`` says what is pinned (``reserved``), what is handed out (``in_use``) and the peak of
each; ``release()`` unpins and frees the blocks in the free lists (``autosp.release_host_memory``).
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from collections.abc import Callable, Hashable

import torch

PAGE = 4096


def block_bytes(nbytes: int) -> int:
    """The pinned bytes a tensor of ``nbytes`` takes in the pool: rounded up to a page."""
    return 0 if nbytes <= 0 else -(-nbytes // PAGE) * PAGE


def _cuda_register(ptr: int, size: int) -> None:
    cudart = torch.cuda.cudart()
    torch.cuda.check_error(cudart.cudaHostRegister(ptr, size, 1))  # 1: cudaHostRegisterPortable


def _cuda_unregister(ptr: int) -> None:
    torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(ptr))


class _Block:
    """One pinned region: ``size`` bytes at ``ptr``, inside ``owner`` (the memory's owner)."""

    __slots__ = ("owner", "ptr", "size")

    def __init__(self, owner: torch.Tensor, ptr: int, size: int) -> None:
        self.owner, self.ptr, self.size = owner, ptr, size


class PinnedPool:
    """Exact-size pinned host blocks, reused by size and stream key; see the module docstring.

    ``register``/``unregister`` pin and unpin a range (CUDA's by default; tests pass their own
    to check the bookkeeping on a machine without a GPU)."""

    def __init__(self, register: Callable[[int, int], None] = _cuda_register,
                 unregister: Callable[[int], None] = _cuda_unregister) -> None:
        self._register, self._unregister = register, unregister
        self._lock = threading.Lock()  # finalizers run on whichever thread drops the storage
        self._free: dict[tuple[Hashable, int], list[_Block]] = {}
        self._blocks: dict[int, _Block] = {}  # ptr -> block, every block the pool has pinned
        self._reserved = self._in_use = self._peak_reserved = self._peak_in_use = 0

    def empty_strided(self, shape, stride, dtype: torch.dtype, stream_key: Hashable) -> torch.Tensor:
        """A pinned host tensor of ``shape`` and ``stride`` covering its memory exactly once (the
        caller checks that). Its contents are undefined until a copy on ``stream_key``'s stream
        fills it."""
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * dtype.itemsize
        size = block_bytes(max(nbytes, 1))
        block = self._take(stream_key, size)
        view = (ctypes.c_char * max(nbytes, 1)).from_address(block.ptr)
        weakref.finalize(view, self._give_back, stream_key, block)
        flat = torch.frombuffer(view, dtype=torch.uint8)[:nbytes]
        return flat.view(dtype).as_strided(tuple(shape), tuple(stride))

    def _take(self, stream_key: Hashable, size: int) -> _Block:
        with self._lock:
            free = self._free.get((stream_key, size))
            if free:
                block = free.pop()
                self._count_in_use(size)
                return block
        block = self._pin(size)
        with self._lock:
            self._count_in_use(size)
        return block

    def _count_in_use(self, size: int) -> None:
        self._in_use += size
        self._peak_in_use = max(self._peak_in_use, self._in_use)

    def _pin(self, size: int) -> _Block:
        try:
            return self._new_block(size)
        except RuntimeError:  # the host is full: give back what waits unused, then try once more
            if not self.release():
                raise
            return self._new_block(size)

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

    def _give_back(self, stream_key: Hashable, block: _Block) -> None:
        with self._lock:
            self._in_use -= block.size
            self._free.setdefault((stream_key, block.size), []).append(block)

    def release(self) -> int:
        """Unpin and free every block not in use; returns the bytes released."""
        with self._lock:
            blocks = [b for free in self._free.values() for b in free]
            self._free.clear()
            for b in blocks:
                del self._blocks[b.ptr]
                self._reserved -= b.size
        for b in blocks:
            self._unregister(b.ptr)
        return sum(b.size for b in blocks)

    def stats(self) -> dict[str, int]:
        """Pinned bytes: ``reserved`` (pinned by the pool), ``in_use`` (handed out), and the
        peak of each since the last :meth:`reset_peaks`."""
        with self._lock:
            return {"reserved": self._reserved, "in_use": self._in_use,
                    "peak_reserved": self._peak_reserved, "peak_in_use": self._peak_in_use}

    def reset_peaks(self) -> None:
        with self._lock:
            self._peak_reserved, self._peak_in_use = self._reserved, self._in_use


# The process's pool, as torch's caching host allocator is the process's: the offload's saved
# tensors outlive any one call, and blocks are shared by every compiled region of the process.
POOL = PinnedPool()
