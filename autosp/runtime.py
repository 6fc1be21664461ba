"""What runs at every step around a compiled region: the plan check, the output layout, and
``reduce_gradients`` for users without DDP/FSDP."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from autosp.plan import Plan
from autosp.report import save_report

log = logging.getLogger(__name__)


class PlanMismatchError(RuntimeError):
    """Ranks of one sequence-parallel group built different plans for the same region."""


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` (local-shard convention -> DTensor's)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class CompiledRegion:
    """The callable the backend returns for one region."""

    def __init__(self, compiled, plan: Plan, group, output_specs, seq_source, kernel_ctx):
        self.compiled = compiled
        self.plan = plan
        self.group = group
        self.output_specs = output_specs or []
        self.seq_source = seq_source  # (input index, dim) holding S, for DTensor shapes
        self.kernel_ctx = kernel_ctx
        self._checked = group is None or not plan.active or not plan.options.get("check_plan", True)
        self._mesh = None
        # The memory planner's estimate meets the device once: the peak after the first forward.
        self._measure_peak = "predicted_peak" in plan.memory and torch.cuda.is_available()

    def __call__(self, *args):
        if not self._checked:
            check_plan_agreement(self.plan, self.group)
            self._checked = True
        with self.kernel_ctx():
            outs = self.compiled(*args)
        if self._measure_peak:
            self._record_forward_peak()
        if any(self.output_specs):
            outs = self._wrap_outputs(list(outs), args)
        return outs

    def _record_forward_peak(self) -> None:
        """Once, after the first forward: the device's peak so far (this process, since the last
        reset of its peak statistics) beside the planner's prediction, in the plan and report."""
        self._measure_peak = False
        self.plan.memory["measured_forward_peak"] = torch.cuda.max_memory_allocated()
        save_report(self.plan)

    def _wrap_outputs(self, outs: list, args) -> list:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        idx, dim = self.seq_source
        seq_len = args[idx] if not isinstance(args[idx], torch.Tensor) else args[idx].shape[dim]
        world = dist.get_world_size(self.group)
        for i, spec in enumerate(self.output_specs):
            if spec is None:
                continue
            _, d, _ = spec
            local = outs[i]
            if self._mesh is None:
                self._mesh = DeviceMesh.from_group(self.group, local.device.type)
            shape = list(local.shape)
            shape[d] = int(seq_len)
            stride = torch.empty(shape, device="meta").stride()
            if local.requires_grad:
                local = _ScaleGrad.apply(local, world)
            outs[i] = DTensor.from_local(local, self._mesh, [Shard(d)], run_check=False, shape=torch.Size(shape), stride=stride)
        return outs


def check_plan_agreement(plan: Plan, group) -> None:
    """Raise PlanMismatchError (on every rank) unless all ranks of ``group`` built the same plan."""
    mine = (plan.digest(), plan.fingerprint())
    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    digests = {g[0] for g in gathered}
    if len(digests) == 1:
        log.debug("autosp region %s: plan agreed by %d ranks", plan.region, world)
        return
    first = gathered[0][1]
    lines = []
    for r, (_, fp) in enumerate(gathered):
        for key in sorted(set(first) | set(fp)):
            if first.get(key) != fp.get(key):
                lines.append(f"rank {r} differs from rank 0 in {key!r}: {str(fp.get(key))[:300]} vs {str(first.get(key))[:300]}")
    raise PlanMismatchError(
        f"autosp region {plan.region}: the ranks of the sequence-parallel group built different plans "
        "(do all ranks pass the same full-length batch and the same options?)\n" + "\n".join(lines)
    )


SMALL_GRAD_BYTES = 1 << 20  # gradients below this share one coalesced all-reduce per dtype


def reduce_gradients(model: torch.nn.Module, group=None) -> None:
    """Average parameter gradients over the sequence-parallel group (what DDP/FSDP already do).

    Each large gradient is all-reduced in place (no second copy of the gradients exists at the
    optimizer step: a flat copy of 1.5B bf16 gradients is 2.8 GiB); gradients under
    ``SMALL_GRAD_BYTES`` (norm weights, biases) are packed into one buffer per dtype, so that
    a model's hundreds of tiny tensors cost one collective. All are issued asynchronously and
    waited for together."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        group = dist.group.WORLD
    world = dist.get_world_size(group)
    if world == 1:
        return
    small: dict[torch.dtype, list[torch.Tensor]] = {}
    pending: list[tuple[Any, torch.Tensor, list[torch.Tensor]]] = []  # (work, reduced, grads it holds)
    for p in model.parameters():
        g = p.grad
        if g is None:
            continue
        if g.numel() * g.element_size() < SMALL_GRAD_BYTES or not g.is_contiguous():
            small.setdefault(g.dtype, []).append(g)
        else:
            pending.append((dist.all_reduce(g, group=group, async_op=True), g, [g]))
    for grads in small.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        pending.append((dist.all_reduce(flat, group=group, async_op=True), flat, grads))
    for work, reduced, grads in pending:
        work.wait()
        reduced.div_(world)
        if len(grads) == 1 and grads[0] is reduced:
            continue
        offset = 0
        for g in grads:
            g.copy_(reduced[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
