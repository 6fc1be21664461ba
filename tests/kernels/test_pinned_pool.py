"""pinned_pool: blocks of the size asked for, pinned once, back in the free list when the last
alias of a tensor dies (not when one Python object does), kept apart by stream, unpinned only
after their stream's work; on CPU with a fake pin (the bookkeeping), on CUDA with the real one
(async copies through it)."""

from __future__ import annotations

import gc

import pytest
import torch

from autosp.kernels.pinned_pool import PAGE, PinnedPool, block_bytes


class FakePin:
    """Records the ranges the pool pins and unpins, and the fences it waits for."""

    def __init__(self) -> None:
        self.pinned: dict[int, int] = {}
        self.calls = 0
        self.log: list[str] = []

    def fence(self, stream):
        log = self.log

        class Done:
            def synchronize(self):
                log.append(f"wait {stream}")

        return Done()

    def register(self, ptr: int, size: int) -> None:
        assert ptr % PAGE == 0 and size % PAGE == 0
        assert all(ptr + size <= p or p + s <= ptr for p, s in self.pinned.items()), "overlapping pins"
        self.pinned[ptr] = size
        self.calls += 1

    def unregister(self, ptr: int) -> None:
        del self.pinned[ptr]
        self.log.append("unpin")


def pool() -> tuple[PinnedPool, FakePin]:
    pin = FakePin()
    return PinnedPool(pin.register, pin.unregister, pin.fence), pin


def test_block_sizes_are_whole_pages_not_powers_of_two():
    assert [block_bytes(n) for n in (0, 1, PAGE, PAGE + 1)] == [0, PAGE, PAGE, 2 * PAGE]
    assert block_bytes(3 * 2**29) == 3 * 2**29


def test_a_tensor_has_the_shape_strides_and_memory_asked_for():
    p, pin = pool()
    h = p.empty_strided((3, 5, 7), (35, 1, 5), torch.bfloat16, "dev0")  # a permuted dense layout
    assert h.shape == (3, 5, 7) and h.stride() == (35, 1, 5) and h.dtype == torch.bfloat16
    assert h.device.type == "cpu" and h.data_ptr() % PAGE == 0
    x = torch.randn(3, 7, 5).to(torch.bfloat16).transpose(1, 2)
    h.copy_(x)
    assert torch.equal(h, x)
    assert list(pin.pinned.values()) == [block_bytes(3 * 5 * 7 * 2)]
    assert p.stats()["in_use"] == p.stats()["reserved"] == PAGE


def test_a_block_comes_back_when_the_last_alias_dies_and_is_reused():
    p, pin = pool()
    h = p.empty_strided((1000,), (1,), torch.float32, "dev0")
    ptr = h.data_ptr()
    alias = h[10:].view(2, 495)  # what a reinterpreting consumer keeps
    del h
    gc.collect()
    assert p.stats()["in_use"] == block_bytes(4000)  # still held by the alias
    again = p.empty_strided((1000,), (1,), torch.float32, "dev0")
    assert again.data_ptr() != ptr  # not handed out twice
    del alias, again
    gc.collect()
    assert p.stats()["in_use"] == 0
    for _ in range(5):  # steps: the same sizes are met from the free list, nothing new pinned
        hs = [p.empty_strided((1000,), (1,), torch.float32, "dev0") for _ in range(2)]
        del hs
        gc.collect()
    assert pin.calls == 2 and p.stats()["reserved"] == 2 * block_bytes(4000)


def test_free_lists_are_per_stream():
    p, pin = pool()
    a = p.empty_strided((PAGE,), (1,), torch.uint8, "s0")
    b = p.empty_strided((PAGE,), (1,), torch.uint8, "s1")
    del a
    gc.collect()
    c = p.empty_strided((PAGE,), (1,), torch.uint8, "s0")  # a's block: same size, same stream
    assert pin.calls == 2
    del b, c
    gc.collect()
    d = p.empty_strided((PAGE,), (1,), torch.uint8, "s2")  # another stream's blocks are not handed over
    assert pin.calls == 3 and d.numel() == PAGE


def test_a_slightly_shorter_batch_reuses_a_longer_ones_block():
    p, pin = pool()
    del pin  # only the counts below
    big = p.empty_strided((9 * PAGE,), (1,), torch.uint8, "s0")
    del big
    gc.collect()
    small = p.empty_strided((8 * PAGE,), (1,), torch.uint8, "s0")  # 9 pages for 8: within 1/SLACK, reused
    assert p.stats()["reserved"] == 9 * PAGE and p.stats()["in_use"] == 9 * PAGE
    del small
    gc.collect()
    half = p.empty_strided((5 * PAGE,), (1,), torch.uint8, "s0")  # 9 pages for 5: not reused, unpinned
    assert p.stats()["reserved"] == 5 * PAGE and half.numel() == 5 * PAGE


def test_a_block_given_back_inside_the_pools_lock_does_not_deadlock():
    """A finalizer runs where the storage dies: inside a garbage collection that an allocation
    under the pool's own lock set off, for one. Giving back must not take the lock."""
    p, _ = pool()
    h = p.empty_strided((10,), (1,), torch.float32, "s0")
    with p._lock:
        del h  # the finalizer runs here, on the thread holding the lock
    assert p.stats()["in_use"] == 0 and p.stats()["reserved"] == PAGE


def test_a_failed_fence_or_unpin_loses_no_block():
    pin = FakePin()

    def fence(stream):
        raise RuntimeError("no event")

    p = PinnedPool(pin.register, pin.unregister, fence)
    h = p.empty_strided((10,), (1,), torch.float32, "s0")
    del h
    gc.collect()
    assert p.stats()["in_use"] == 0  # back in the free list, to be unpinned after the whole device's work
    failing = PinnedPool(pin.register, lambda ptr: (_ for _ in ()).throw(RuntimeError("unpin failed")), pin.fence)
    a, b = (failing.empty_strided((n,), (1,), torch.uint8, "s0") for n in (PAGE, 2 * PAGE))
    del a, b
    gc.collect()
    with pytest.raises(RuntimeError, match="unpin failed"):
        failing.release()
    assert failing.stats()["reserved"] == 3 * PAGE  # still pinned, still in the books


def test_changing_shapes_do_not_pile_up_pinned_memory():
    """A size no free block fits unpins the free blocks before pinning: lengths that grow from
    step to step hold one step's blocks, not every step's."""
    p, pin = pool()
    for step in range(1, 6):
        hs = [p.empty_strided((step * 3 * PAGE,), (1,), torch.uint8, "s0") for _ in range(2)]
        assert p.stats()["reserved"] == 2 * step * 3 * PAGE
        del hs
        gc.collect()
    assert len(pin.pinned) == 2


def test_unpinning_waits_for_the_blocks_stream():
    p, pin = pool()
    h = p.empty_strided((10,), (1,), torch.float32, "s0")
    del h
    gc.collect()
    assert p.release() == PAGE
    assert pin.log == ["wait s0", "unpin"]


def test_release_unpins_free_blocks_only():
    p, pin = pool()
    kept = p.empty_strided((10,), (1,), torch.float32, "dev0")
    freed = p.empty_strided((10, 2000), (2000, 1), torch.float32, "dev0")
    del freed
    gc.collect()
    assert p.release() == block_bytes(80000) and len(pin.pinned) == 1
    assert p.stats()["reserved"] == PAGE
    kept.fill_(1.0)  # still usable
    del kept
    gc.collect()
    total = PAGE + block_bytes(80000)
    assert p.release() == PAGE and not pin.pinned and p.stats() == {
        "reserved": 0, "in_use": 0, "peak_reserved": total, "peak_in_use": total}
    p.reset_peaks()
    assert p.stats()["peak_reserved"] == 0


def test_a_failed_pin_raises_after_the_free_blocks_are_gone_and_leaves_the_books_right():
    pin = FakePin()

    def register(ptr, size):
        if size > 4 * PAGE:  # "the host is full"
            raise RuntimeError("cudaErrorMemoryAllocation")
        pin.register(ptr, size)

    p = PinnedPool(register, pin.unregister, pin.fence)
    first = p.empty_strided((10,), (1,), torch.float32, "s0")
    del first
    gc.collect()
    with pytest.raises(RuntimeError, match="cudaErrorMemoryAllocation"):
        p.empty_strided((5000,), (1,), torch.float32, "s0")
    assert not pin.pinned and p.stats()["reserved"] == p.stats()["in_use"] == 0  # the free block went first
    assert p.empty_strided((10,), (1,), torch.float32, "s0").numel() == 10


@pytest.mark.gpu
def test_cuda_pool_tensors_are_pinned_and_take_async_copies():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    p, transfer = PinnedPool(), torch.cuda.Stream()
    x = torch.randn(3 * 2**20 + 5, device="cuda")  # not a power of two, not whole pages
    h = p.empty_strided(x.shape, x.stride(), x.dtype, transfer)
    assert h.is_pinned()
    y = torch.empty_like(x)
    transfer.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(transfer):
        h.copy_(x, non_blocking=True)
        y.copy_(h, non_blocking=True)
    transfer.synchronize()
    assert torch.equal(x, y)
    nbytes = x.numel() * 4
    assert p.stats()["reserved"] == block_bytes(nbytes) < 1 << (nbytes - 1).bit_length()  # torch's block: 16 MiB
    del h
    gc.collect()
    assert p.release() == block_bytes(nbytes)  # after an event on the transfer stream
