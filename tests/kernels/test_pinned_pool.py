"""pinned_pool: exact-size blocks, pinned once, back in the free list when the last alias of a
tensor dies (not when one Python object does), kept apart by stream key; on CPU with a fake
pin (the bookkeeping), on CUDA with the real one (async copies through it)."""

from __future__ import annotations

import gc

import pytest
import torch

from autosp.kernels.pinned_pool import PAGE, PinnedPool, block_bytes


class FakePin:
    """Records the ranges the pool pins and unpins."""

    def __init__(self) -> None:
        self.pinned: dict[int, int] = {}
        self.calls = 0

    def register(self, ptr: int, size: int) -> None:
        assert ptr % PAGE == 0 and size % PAGE == 0
        assert all(ptr + size <= p or p + s <= ptr for p, s in self.pinned.items()), "overlapping pins"
        self.pinned[ptr] = size
        self.calls += 1

    def unregister(self, ptr: int) -> None:
        del self.pinned[ptr]


def pool() -> tuple[PinnedPool, FakePin]:
    pin = FakePin()
    return PinnedPool(pin.register, pin.unregister), pin


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


def test_free_lists_are_per_size_and_stream_key():
    p, pin = pool()
    a = p.empty_strided((PAGE,), (1,), torch.uint8, "dev0")
    del a
    gc.collect()
    b = p.empty_strided((PAGE,), (1,), torch.uint8, "dev1")  # another device's stream: a new block
    c = p.empty_strided((2 * PAGE,), (1,), torch.uint8, "dev0")  # another size: a new block
    assert pin.calls == 3
    del b, c
    gc.collect()
    assert p.stats()["peak_in_use"] == 3 * PAGE


def test_release_unpins_free_blocks_only():
    p, pin = pool()
    kept = p.empty_strided((10,), (1,), torch.float32, "dev0")
    freed = p.empty_strided((10, 10), (10, 1), torch.float32, "dev0")
    del freed
    gc.collect()
    assert p.release() == PAGE and len(pin.pinned) == 1
    assert p.stats()["reserved"] == PAGE
    kept.fill_(1.0)  # still usable
    del kept
    gc.collect()
    assert p.release() == PAGE and not pin.pinned and p.stats() == {
        "reserved": 0, "in_use": 0, "peak_reserved": 2 * PAGE, "peak_in_use": 2 * PAGE}
    p.reset_peaks()
    assert p.stats()["peak_reserved"] == 0


def test_a_failed_pin_releases_the_free_blocks_and_retries_once():
    pin = FakePin()
    failures = []

    def register(ptr, size):
        if len(pin.pinned) >= 1 and not failures:  # "the host is full" once
            failures.append(size)
            raise RuntimeError("cudaErrorMemoryAllocation")
        pin.register(ptr, size)

    p = PinnedPool(register, pin.unregister)
    first = p.empty_strided((10,), (1,), torch.float32, "dev0")
    del first
    gc.collect()
    second = p.empty_strided((5000,), (1,), torch.float32, "dev0")  # fails, releases the first, retries
    assert failures and len(pin.pinned) == 1 and second.numel() == 5000
    with pytest.raises(RuntimeError, match="cudaErrorMemoryAllocation"):
        failures.clear()
        p.empty_strided((7000,), (1,), torch.float32, "dev0")  # nothing free to release: the error stands


@pytest.mark.gpu
def test_cuda_pool_tensors_are_pinned_and_take_async_copies():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    p = PinnedPool()
    x = torch.randn(3 * 2**20 + 5, device="cuda")  # not a power of two, not whole pages
    h = p.empty_strided(x.shape, x.stride(), x.dtype, x.device)
    assert h.is_pinned()
    h.copy_(x, non_blocking=True)
    y = torch.empty_like(x)
    y.copy_(h, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(x, y)
    assert p.stats()["reserved"] == block_bytes(x.numel() * 4) < 2 ** (x.numel() * 4).bit_length()
    del h
    gc.collect()
    assert p.release() == block_bytes(x.numel() * 4)
