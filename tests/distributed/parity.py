"""Parity of autosp against the single-process run of the same model and batch.

Every rank builds the same model and full batch from a seed, runs the one-process reference
(eager, no autosp) and the autosp-compiled model, and compares loss, outputs and every
parameter gradient (after ``autosp.reduce_gradients``, i.e. the mean over the group; with
``overlap_grad_reduce`` the gradient as the backward leaves it, no ``reduce_gradients``: the
backward must have made the mean, and a partial gradient fails the comparison).

Tolerances, fp32 (dtype, what, rtol):
  loss      1e-5  one all-reduce of a sum changes only the order of additions
  logits    1e-5  per-token math is the same; attention sums keys in the same order
  gradients 1e-4  max |g - g_ref| / max |g_ref| per parameter; sums over ranks reorder additions

bf16 (NCCL on GPUs; the reference is the same bf16 model on one GPU):
  loss      1e-2  bf16 logits; the loss itself is summed in fp32 by the model's upcast
  logits    2e-2  bf16 rounding of attention outputs summed in another order
  gradients 5e-2  bf16 gradients accumulated over ranks in another order

A bf16 logits or gradient error beyond its row, but within twice it, is not yet a failure: both
bf16 runs are also compared with the exact answer, the same weights in fp32 on one device, and
the value passes if autosp is at most ``BF16_FACTOR`` times as far from it as the one-device
bf16 run is (the tolerance follows the reference's own rounding error, as torch's SDPA tests
scale theirs by the low-precision reference's deviation). Gradients are judged parameter by
parameter. The result says which values passed that way (``passed_by_fp32``).
"""

from __future__ import annotations

import copy
import glob
import re
import tempfile
from dataclasses import dataclass

import torch

TOL = {"loss": 1e-5, "logits": 1e-5, "grad": 1e-4}
TOL_BF16 = {"loss": 1e-2, "logits": 2e-2, "grad": 5e-2}
BF16_FACTOR = 2.0


@dataclass(frozen=True)
class Case:
    model: str
    batch: int = 1
    seq: int = 17
    labels: str = "ids"  # ids | spans | rank_masked | none | padded (right padding + attention_mask)
    #                     | packed (documents packed in each row: position_ids restart at each)
    outputs: str = "full"
    mode: str = "train"  # train | eval | no_grad
    compiler: str = "aot_eager"
    dtype: str = "float32"
    seqs: tuple = ()  # further sequence lengths run through the same compiled model
    options: tuple = ()  # more autosp options, as (name, value) pairs

    @property
    def id(self) -> str:
        extra = f"-then{'_'.join(map(str, self.seqs))}" if self.seqs else ""
        extra += "".join(f"-{k}={v}" for k, v in self.options)
        return f"{self.model}-b{self.batch}-s{self.seq}-{self.labels}-{self.outputs}-{self.mode}-{self.compiler}-{self.dtype}{extra}"


def check(result: dict, tol: dict) -> None:
    """Assert one rank's result of ``run_case`` within the tolerance table ``tol``."""
    assert "error" not in result, result.get("error")
    for what in ("logits", "grad"):
        if what in result and result[what] > tol[what]:
            assert _within_bf16_rounding(result, what, tol[what]), result
            result.setdefault("passed_by_fp32", []).append(what)
    if "loss" in result:
        assert result["loss"] <= tol["loss"], result
    if "peer_exchanges" in result:  # exchange='peer_copy' fell back to NCCL nowhere
        assert all(result["peer_exchanges"].values()), result["peer_exchanges"]
    assert result.get("state_untouched", True), result


def _within_bf16_rounding(result: dict, what: str, tol: float) -> bool:
    """Whether every value of ``what`` (the logits; or each parameter's gradient) is within
    ``tol`` of the one-device bf16 run, or within twice it and at most ``BF16_FACTOR`` times as
    far from the fp32 run as that run is; False without an fp32 run."""
    fp32 = result.get(f"{what}_vs_fp32")
    if fp32 is None:
        return False
    return all(direct <= tol or (direct <= 2 * tol and autosp_err <= BF16_FACTOR * ref_err)
               for direct, autosp_err, ref_err in fp32.values())


def make_batch(case: Case, world: int, device="cpu"):
    from tests.distributed.models import VOCAB

    g = torch.Generator().manual_seed(1234 + case.seq)
    ids = torch.randint(0, VOCAB, (case.batch, case.seq), generator=g).to(device)
    if case.labels == "none":
        return ids, None
    labels = ids.clone()
    if case.labels == "spans":
        labels[:, 2:5] = -100
        labels[0, -3:] = -100
    elif case.labels == "rank_masked":
        labels[:, case.seq // world :] = -100  # the shards of every rank but the first hold no target
    elif case.labels == "padded":
        labels[0, -4:] = -100  # row 0 is right-padded: its last 4 tokens are padding
    return ids, labels


def attention_mask(case: Case, ids):
    """A 2-D padding mask (1 = token) for the "padded" case, else None."""
    if case.labels != "padded":
        return None
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    return mask


def model_kwargs(case: Case, ids) -> dict:
    """What the batch passes beside input_ids and labels: a padding mask ("padded") or the
    positions of packed documents ("packed": row r holds documents of 5, 1 and 4 + r tokens,
    then one to the end; positions restart at 0 in each)."""
    mask = attention_mask(case, ids)
    if mask is not None:
        return {"attention_mask": mask}
    if case.labels != "packed":
        return {}
    rows = []
    for r in range(ids.shape[0]):
        lengths = [5, 1, 4 + r]
        lengths.append(ids.shape[1] - sum(lengths))
        rows.append(torch.cat([torch.arange(n) for n in lengths]))
    return {"position_ids": torch.stack(rows).to(ids.device)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def run_case(case: Case, rank: int, world: int) -> dict:
    import autosp
    from tests.distributed.models import build, forward

    torch._dynamo.reset()
    device = f"cuda:{torch.cuda.current_device()}" if torch.distributed.get_backend() == "nccl" else "cpu"
    model = build(case.model).to(device=device, dtype=getattr(torch, case.dtype))
    ref = copy.deepcopy(model)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, labels = make_batch(case, world, device)
    if case.mode == "eval":
        model.eval()
        ref.eval()
    grad_ctx = torch.no_grad if case.mode == "no_grad" else torch.enable_grad

    kw = model_kwargs(case, ids)
    exact = copy.deepcopy(ref).float() if case.dtype != "float32" else None  # the same weights, in fp32
    with grad_ctx():
        ref_loss, ref_logits = forward(ref, ids, labels, **kw)
        exact_loss, exact_logits = forward(exact, ids, labels, **kw) if exact is not None else (None, None)
    options = dict(case.options)
    if options.get("exchange") == "peer_copy":  # its report says how many all-to-alls the copy engines carried
        options.setdefault("dump_dir", tempfile.mkdtemp(prefix="autosp_parity_"))
    compiled = torch.compile(model, backend=autosp.backend(compiler=case.compiler, outputs=case.outputs, **options))
    with grad_ctx():
        loss, logits = forward(compiled, ids, labels, **kw)

    if "attention_mask" in kw:  # logits of padding positions are not compared (masked rows differ by kernel)
        keep = kw["attention_mask"].bool()
        logits, ref_logits = logits * keep[..., None], ref_logits * keep[..., None]
        exact_logits = exact_logits * keep[..., None] if exact is not None else None
    if options.get("logits") == "detach":
        assert not logits.requires_grad
    if options.get("logits") == "drop":  # nothing to compare: the logits were never computed
        assert logits.numel() == 0, list(logits.shape)
        full_logits = ref_logits
    elif case.outputs == "dtensor":
        full_logits = logits.full_tensor()
    elif case.outputs == "local":
        full_logits = torch.cat(_all_gather_var(logits, dim=1), dim=1)
    else:
        full_logits = logits
    out = {"case": case.id, "rank": rank, "logits": _rel(full_logits.detach(), ref_logits.detach())}
    if exact is not None:
        out["logits_vs_fp32"] = {"logits": (out["logits"], _rel(full_logits.detach(), exact_logits),
                                            _rel(ref_logits.detach(), exact_logits))}
    if ref_loss is not None:
        out["loss"] = abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-12)
        out["loss_values"] = (loss.item(), ref_loss.item())
    if case.mode == "train":
        (loss if loss is not None else logits.float().pow(2).mean()).backward() if ref_loss is not None else None
        if ref_loss is None:
            return out
        ref_loss.backward()
        if ("overlap_grad_reduce", True) not in case.options:  # else the backward made the group mean
            autosp.reduce_gradients(model)
        errs, vs_fp32 = {}, {}
        if exact is not None:
            exact_loss.backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            if q.grad is None:
                continue
            errs[name] = float("inf") if p.grad is None else _rel(p.grad, q.grad)
            if exact is not None:
                e = exact.get_parameter(name).grad
                vs_fp32[name] = (errs[name], float("inf") if p.grad is None else _rel(p.grad, e), _rel(q.grad, e))
        if vs_fp32:
            out["grad_vs_fp32"] = vs_fp32
        out["grad"] = max(errs.values())
        out["worst_grad"] = max(errs, key=errs.get)
        if options.get("exchange") == "peer_copy":
            out["peer_exchanges"] = peer_exchanges(options["dump_dir"], rank)
    out["state_untouched"] = all(torch.equal(state_before[k], v) for k, v in model.state_dict().items()) if case.mode != "train" else True
    for seq in case.seqs:  # the same compiled model on another length: recompiled (dynamic) and exact
        other = Case(case.model, case.batch, seq, case.labels, case.outputs, case.mode, case.compiler, case.dtype,
                     options=case.options)
        ids2, labels2 = make_batch(other, world, device)
        loss2, _ = forward(compiled, ids2, labels2)
        ref2, _ = forward(ref, ids2, labels2)
        out["loss"] = max(out.get("loss", 0.0), abs(loss2.item() - ref2.item()) / abs(ref2.item()))
    return out


def peer_exchanges(dump_dir: str, rank: int) -> dict[str, int]:
    """All-to-alls the copy engines carried, forward and backward, by this rank's region reports."""
    done = {"forward": 0, "backward": 0}
    for path in glob.glob(f"{dump_dir}/autosp_region_*_rank{rank}.txt"):
        for n, which in re.findall(r"peer_exchange: (\d+) all-to-alls of the (forward|backward)", open(path).read()):
            done[which] += int(n)
    return done


def _all_gather_var(t: torch.Tensor, dim: int) -> list[torch.Tensor]:
    import torch.distributed as dist

    sizes = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, t.shape[dim])
    pad = max(sizes) - t.shape[dim]
    tp = torch.nn.functional.pad(t.detach(), [0, 0] * (t.dim() - 1 - dim) + [0, pad])
    parts = [torch.empty_like(tp) for _ in sizes]
    dist.all_gather(parts, tp.contiguous())
    return [p.narrow(dim, 0, s) for p, s in zip(parts, sizes, strict=True)]


def run_cases(rank: int, world: int, cases: list[Case]) -> list[dict]:
    import time

    results = []
    for case in cases:
        began = time.perf_counter()
        try:
            results.append({**run_case(case, rank, world), "seconds": round(time.perf_counter() - began, 2)})
        except Exception as e:  # one case's failure must not hide the others
            import traceback

            results.append({"case": case.id, "rank": rank, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"})
    return results
