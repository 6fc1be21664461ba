"""autosp: sequence parallelism for unmodified models, as a ``torch.compile`` backend.

    model = torch.compile(model, backend="autosp")     # torchrun --nproc-per-node=N train.py
    loss = model(input_ids=ids, labels=ids).loss       # the same full batch on every rank
    loss.backward()                                    # mean of grads over the group == one device
"""

from autosp.backend import autosp_backend, backend
from autosp.config import Config
from autosp.explain import explain
from autosp.kernels.pinned_pool import POOL as _PINNED
from autosp.optim import ShardedOptimizer
from autosp.report import Report
from autosp.runtime import PlanMismatchError, reduce_gradients


def host_memory_stats() -> dict[str, int]:
    """The offload's pinned host memory in this process, in bytes: ``reserved`` (pinned),
    ``in_use`` (held by saved tensors now) and the peak of each."""
    return _PINNED.stats()


def release_host_memory() -> int:
    """Unpin and free the offload's pinned blocks that no saved tensor holds (as
    ``torch.cuda.empty_cache`` does for the device); returns the bytes freed. The next step
    that offloads pins its blocks again."""
    return _PINNED.release()


__all__ = ["Config", "PlanMismatchError", "Report", "ShardedOptimizer", "autosp_backend", "backend", "explain", "host_memory_stats",
           "reduce_gradients", "release_host_memory"]
__version__ = "0.1.0"
