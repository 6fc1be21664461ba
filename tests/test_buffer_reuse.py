"""``Config.buffer_reuse=False``: the region's Inductor code, forward and backward, frees a dead
buffer at its last use instead of holding it for a later buffer of the same size. (A kernel that
writes its output over an input it is the last reader of, Inductor's in-place buffers, stays:
that hand-over happens at the last use and holds nothing.)"""

from __future__ import annotations

import torch

import autosp
from tests.harness_fake import inductor_code
from tests.passes.models_tiny import tiny_llama


def _code(**options) -> str:
    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2)
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    backend = autosp.backend(compiler="inductor", recompute="full", tile_mlp=2, **options)
    return inductor_code(lambda i: model(input_ids=i, labels=i, use_cache=False).loss, ids, backend=backend,
                         backward=True)


def test_buffer_reuse_off_reaches_forward_and_backward():
    on, off = _code(), _code(buffer_reuse=False)
    assert on.count("def call(") >= 2 and off.count("def call(") >= 2  # forward and backward
    # Inductor's default hands dead buffers on to later allocations of the same size; off, only
    # the in-place hand-overs are left.
    assert on.count("# reuse") > off.count("# reuse")
