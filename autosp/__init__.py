"""autosp: sequence parallelism for unmodified models, as a ``torch.compile`` backend.

    model = torch.compile(model, backend="autosp")     # torchrun --nproc-per-node=N train.py
    loss = model(input_ids=ids, labels=ids).loss       # the same full batch on every rank
    loss.backward()                                    # mean of grads over the group == one device
"""

from autosp.backend import autosp_backend, backend
from autosp.config import Config
from autosp.explain import explain
from autosp.report import Report
from autosp.runtime import PlanMismatchError, reduce_gradients

__all__ = ["Config", "PlanMismatchError", "Report", "autosp_backend", "backend", "explain", "reduce_gradients"]
__version__ = "0.1.0"
