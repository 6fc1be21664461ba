"""Markers: ``gpu`` needs CUDA, ``multigpu`` two or more GPUs; both skip cleanly without them.
Every test starts and ends with an empty Dynamo cache, so no compiled code leaks between tests.

Inductor's CPU code is compiled without its vector instructions here (``TORCHINDUCTOR_VEC_ISA_OK=0``,
unless set): the tests compile Inductor's CPU kernels for tiny models, never time them, and g++
takes a quarter less time on the scalar code (the two Inductor cases of the 2-rank gloo parity
group: 54 s against 71 s on a 2-core machine). Spawned ranks inherit it."""

import os

os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "gpu" in item.keywords and n_gpu < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and n_gpu < 2:
            item.add_marker(pytest.mark.skip(reason="needs two or more CUDA GPUs"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
