"""Part of autosp._torch_private (see its docstring): GPU memory mapped across the ranks of a group (torch's symmetric memory) and the CUDA driver's stream memory operations."""

from __future__ import annotations

import functools

import torch


class PeerBuffers:
    """A CUDA buffer every rank of a group allocated alike, mapped into each other's address space
    (torch's private ``torch.distributed._symmetric_memory``): ``local`` is this rank's,
    ``remote(rank, start, numel)`` a view of ``numel`` elements of that rank's buffer from
    ``start``, which a ``copy_`` here writes over NVLink (a device-to-device memcpy: the copy
    engines, no SMs). ``barrier(channel)`` is a kernel on the current stream that returns on
    every rank once every rank's stream has reached it (channels are independent)."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device, group) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.local = symm_mem.empty(numel, dtype=dtype, device=device)
        self._handle = symm_mem.rendezvous(self.local, group.group_name)
        self.numel, self.dtype = numel, dtype
        mine = self.remote(self._handle.rank, 0, numel)
        if mine.data_ptr() != self.local.data_ptr():  # a torch that places buffers otherwise
            raise RuntimeError("PeerBuffers: this rank's mapped view is not its own buffer "
                               f"({mine.data_ptr():#x} against {self.local.data_ptr():#x})")

    @property
    def nbytes(self) -> int:
        """Device bytes this buffer holds outside the caching allocator (which
        ``torch.cuda.max_memory_allocated`` does not count): the buffer and its signal pad."""
        return self.local.nbytes + int(getattr(self._handle, "signal_pad_size", 0))

    def remote(self, rank: int, start: int, numel: int) -> torch.Tensor:
        if start < 0 or start + numel > self.numel:
            raise ValueError(f"PeerBuffers.remote: [{start}, {start + numel}) is outside the {self.numel} elements")
        return self._handle.get_buffer(rank, (numel,), self.dtype, start)

    def barrier(self, channel: int) -> None:
        self._handle.barrier(channel=channel)


# CUDA stream memory operations (the driver's cuStreamWaitValue32 / cuStreamWriteValue32; torch
# exposes a write alone): a stream waits, in its own order, until a 32-bit word of device memory
# holds a value, or writes one after all its earlier work, with no kernel (the stream's front
# end does it: no SM is taken). The word may be another GPU's, mapped here (``PeerBuffers``):
# one GPU's stream writes a flag into a peer's memory after its copies, and the peer's stream
# waits for it. The write orders every earlier write of the stream before it (the default
# flags: a memory barrier).
WAIT_EQ, WAIT_GEQ = 0x1, 0x0  # CU_STREAM_WAIT_VALUE_EQ, _GEQ ((int32)(*addr - value) >= 0)


CU_MODULE_EAGER_LOADING = 0x1  # CUmoduleLoadingMode (CU_MODULE_LAZY_LOADING = 0x2)


@functools.cache
def _driver():
    import ctypes

    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise RuntimeError(f"stream memory operations need the CUDA driver (libcuda.so.1): {e}") from None


@functools.cache
def _stream_memops():
    import ctypes

    cuda = _driver()
    ops = []
    for name in ("cuStreamWaitValue32", "cuStreamWriteValue32"):
        fn = getattr(cuda, name + "_v2", None) or getattr(cuda, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        fn.restype = ctypes.c_int
        ops.append(fn)
    return tuple(ops)


def _check_driver(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"{what} failed: CUDA driver error {result}")


def stream_wait_value32(stream: torch.cuda.Stream, word: torch.Tensor, value: int, how: int) -> None:
    """``stream`` waits until the int32 ``word`` (a one-element device tensor, this GPU's or a
    peer's mapped here) satisfies ``how`` (``WAIT_EQ`` / ``WAIT_GEQ``) against ``value``."""
    wait, _ = _stream_memops()
    _check_driver(wait(stream.cuda_stream, word.data_ptr(), value & 0xFFFFFFFF, how), "cuStreamWaitValue32")


def stream_write_value32(stream: torch.cuda.Stream, word: torch.Tensor, value: int) -> None:
    """``stream`` writes ``value`` into the int32 ``word`` once its earlier work is done and visible."""
    _, write = _stream_memops()
    _check_driver(write(stream.cuda_stream, word.data_ptr(), value & 0xFFFFFFFF, 0), "cuStreamWriteValue32")


CU_STREAM_NON_BLOCKING = 0x1


def own_stream(device: torch.device) -> torch.cuda.ExternalStream:
    """A CUDA stream of the caller's alone (the driver's ``cuStreamCreate``, non-blocking, like
    torch's own side streams), where ``torch.cuda.Stream`` hands out one of a pool of 32 per
    device round robin: a stream that waits on the device for a peer's flag must not be the
    stream another part of the process (a NCCL communicator, a transfer stream) was also given,
    whose work would queue behind the wait. Destroyed with the returned object (work still
    queued on it runs first: the driver releases it then)."""
    import ctypes
    import weakref

    device = torch.device(device)
    with torch.cuda.device(device):
        torch.cuda.current_stream(device).query()  # the device's primary context, current on this thread
        handle = ctypes.c_void_p()
        _check_driver(_driver().cuStreamCreate(ctypes.byref(handle), CU_STREAM_NON_BLOCKING), "cuStreamCreate")
    stream = torch.cuda.ExternalStream(handle.value, device=device)
    weakref.finalize(stream, _driver().cuStreamDestroy_v2, handle)
    return stream


def lazy_module_loading() -> bool:
    """Whether CUDA loads this process's kernels lazily (``cuModuleGetLoadingMode``, after CUDA
    has started: set by ``CUDA_MODULE_LOADING`` before it starts, lazy by default). A lazily
    loaded kernel's first launch may synchronize the context, which waits for every stream,
    one blocked on a ``stream_wait_value32`` too."""
    import ctypes

    mode = ctypes.c_int()
    _check_driver(_driver().cuModuleGetLoadingMode(ctypes.byref(mode)), "cuModuleGetLoadingMode")
    return mode.value != CU_MODULE_EAGER_LOADING
