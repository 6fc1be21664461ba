"""``autosp.explain``: trace a model, run the passes, return the report, train nothing."""

from __future__ import annotations

from typing import Any

import torch

from autosp.config import Config
from autosp.report import Report


def explain(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Report:
    """Report what autosp would do to ``model(*args, **kwargs)``.

    Keyword arguments that are fields of :class:`autosp.Config` are taken as options; the rest
    go to the model. The model runs once on its unchanged graphs (no collectives, no gradients);
    each compiled region's plan is collected. With the default process group initialized the
    plan is this rank's.
    """
    import dataclasses

    from autosp.backend import plan_region

    names = {f.name for f in dataclasses.fields(Config)}
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    cfg = Config.from_options(options)
    plans = []

    def capture(gm, example_inputs):
        import copy

        original = copy.deepcopy(gm)
        _, plan = plan_region(gm, example_inputs, cfg)
        plans.append(plan)
        return original.forward

    compiled = torch.compile(model, backend=capture, dynamic=False)
    with torch.no_grad():
        compiled(*args, **kwargs)
    return Report(plans)
