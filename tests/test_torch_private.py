"""Each wrapper of a private torch API works on this torch."""

from __future__ import annotations

import torch

from autosp import _torch_private as tp


def test_size_hints_and_symbols():
    seen = {}

    def backend(gm, example_inputs):
        for n in gm.graph.nodes:
            v = n.meta.get("example_value")
            if isinstance(v, torch.SymInt):
                seen["sym"] = v
        seen["mode"] = tp.fake_mode_of([n.meta.get("example_value") for n in gm.graph.nodes])
        seen["id"] = tp.compile_id()
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(lambda x: x * 2, backend=backend, dynamic=True)
    f(torch.randn(5, 3))
    sym = seen["sym"]
    assert tp.is_symbolic(sym) and tp.size_hint(sym) in (5, 3)
    assert tp.same_size(sym, sym) and not tp.same_size(sym, 5) and tp.same_size(4, 4)
    assert tp.size_hint(7) == 7
    assert seen["mode"] is not None
    assert "/" in seen["id"]


def test_backends_and_collectives():
    assert callable(tp.lookup_backend("aot_eager"))
    fc = tp.functional_collectives()
    for name in ("all_to_all_single_autograd", "all_gather_tensor_autograd", "wait_tensor"):
        assert hasattr(fc, name), name


def test_fake_process_group_and_resolve():
    import torch.distributed as dist

    tp.init_fake_process_group(0, 4)
    try:
        assert dist.get_world_size() == 4
        assert tp.resolve_group(dist.group.WORLD.group_name).size() == 4
    finally:
        dist.destroy_process_group()
