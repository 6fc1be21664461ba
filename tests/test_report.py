"""The explain report: readable text, an HTML page with each pass before and after, dump_dir."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import autosp
from autosp.pipeline import PASS_NAMES
from autosp.report import Report
from tests.harness_fake import fake_group, trace_plan
from tests.passes.models_tiny import tiny_llama

HEADINGS = ("attention sites:", "inputs", "cuts", "collectives per step", "fallbacks", "outputs:", "notes:", "passes:")


class CumsumBlock(nn.Module):
    """Causal attention after a cumsum over the sequence (no rule: a fallback in the plan)."""

    def __init__(self, D=16, N=4):
        super().__init__()
        self.N = N
        self.emb = nn.Embedding(64, D)
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, ids_BS):
        x_BSD = torch.cumsum(self.emb(ids_BS), dim=1)
        B, S, D = x_BSD.shape
        q, k, v = (t.view(B, S, self.N, -1).transpose(1, 2) for t in self.qkv(x_BSD).split(D, dim=-1))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()


def _ids(S=17, vocab=128):
    return torch.randint(0, vocab, (1, S), generator=torch.Generator().manual_seed(0))


def test_text_has_every_heading_in_order():
    report = trace_plan(CumsumBlock(), _ids(vocab=64), world=2)
    text = str(report)
    positions = [text.find(h) for h in HEADINGS]
    assert -1 not in positions and positions == sorted(positions), dict(zip(HEADINGS, positions, strict=True))
    assert text.startswith("autosp region 0/0: sequence-parallel group of 2 (this is rank 0), S = 17")
    [plan] = report.plans
    [fallback] = plan.fallbacks
    assert f"  {fallback.node} ({fallback.op}): no layout rule for this op" in text
    assert "all_gather" in text and "all_to_all" in text and "all_reduce(sum)" in text
    assert f"in {len(plan.collectives)} collectives" in text
    assert "passes: eager_attention (unchanged), causal_mask (unchanged), find_attention (unchanged)" in text


def test_text_of_a_region_without_attention():
    report = trace_plan(nn.Linear(4, 4), torch.randn(2, 17, 4), world=2)
    text = str(report)
    assert "attention sites:\n  none" in text
    assert "fallbacks (ops run on the full sequence after a gather):\n  none" in text
    assert "no attention found" in text
    assert "collectives" not in text
    assert str(Report([])) == "autosp: nothing was compiled"


def test_explain_text_and_html(tmp_path):
    ids = _ids()
    with fake_group(2):
        report = autosp.explain(tiny_llama(), input_ids=ids, labels=ids, use_cache=False, compiler="eager")
    text = str(report)
    for heading in ("attention sites:", "cuts", "collectives per step", "fallbacks", "outputs:", "passes:"):
        assert heading in text, heading
    assert "all_to_all" in text and "rewritten" in text
    page = tmp_path / "plan.html"
    report.save_html(str(page))
    html = page.read_text()
    for name in PASS_NAMES:
        assert f"<h3>pass {name}: " in html
    assert "<h3>pass find_attention: unchanged</h3>" in html
    changed = sum(before != after for _, before, after in report.plans[0].passes)
    assert html.count("<th>before</th><th>after</th>") == changed == 6  # causal_mask .. output_layout, fused_loss, grouped_kv
    assert "<span class=add>" in html and "<span class=del>" in html
    assert "seq_to_head" in html
    assert "reduction = &#x27;sum&#x27;" in html  # graph code is escaped


def test_save_text(tmp_path):
    report = trace_plan(CumsumBlock(), _ids(vocab=64), world=2)
    path = tmp_path / "plan.txt"
    report.save_text(str(path))
    assert path.read_text() == str(report) + "\n"


def test_dump_dir_writes_the_report(tmp_path):
    model = tiny_llama()
    ids = _ids()
    compiled = torch.compile(model, backend=autosp.backend(compiler="eager", dump_dir=str(tmp_path)))
    with torch.no_grad():
        compiled(input_ids=ids, labels=ids, use_cache=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["autosp_region_0_0_rank0.html", "autosp_region_0_0_rank0.txt"]
    text = (tmp_path / files[1]).read_text()
    assert "sequence-parallel group of 1" in text
    assert "group of size 1: nothing to shard" in text


def test_dump_dir_during_a_compile_on_two_ranks(tmp_path):
    """A real compile as rank 1 of a fake group: the region runs (no data moves) and the report is this rank's."""
    ids = _ids()
    backend = autosp.backend(compiler="eager", dump_dir=str(tmp_path), check_plan=False)
    with fake_group(2, rank=1):
        out = torch.compile(tiny_llama(), backend=backend)(input_ids=ids, labels=ids, use_cache=False)
        assert list(out.logits.shape) == [1, 17, 128]  # a DTensor: semantically full
        assert list(out.logits.to_local().shape) == [1, 8, 128]  # rank 1 holds positions 9..16
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["autosp_region_0_0_rank1.html", "autosp_region_0_0_rank1.txt"]
    text = (tmp_path / files[1]).read_text()
    assert text.startswith("autosp region 0/0: sequence-parallel group of 2 (this is rank 1), S = 17")
    assert "-> rewritten" in text and "all_to_all" in text and "DTensor sharded on dim 1" in text
    html = (tmp_path / files[0]).read_text()
    assert all(f"pass {name}" in html for name in PASS_NAMES)


def test_memory_timeline_draws_budget_prediction_and_measured_peak(tmp_path):
    from autosp.plan import Plan

    plan = Plan(memory={"budget": 80 << 30, "predicted_peak": 60 << 30, "offload": False, "fits": True,
                        "timeline": [1 << 30, 30 << 30, 20 << 30], "measured_forward_peak": 50 << 30})
    Report([plan]).save_html(str(tmp_path / "r.html"))
    page = (tmp_path / "r.html").read_text()
    assert "<svg" in page and "<polyline" in page
    for label in ("budget 80.0 GiB", "predicted peak of the step 60.0 GiB", "measured peak after the first forward 50.0 GiB"):
        assert label in page
    del plan.memory["measured_forward_peak"]  # before any GPU step: no measured line
    Report([plan]).save_html(str(tmp_path / "r.html"))
    assert "measured peak" not in (tmp_path / "r.html").read_text()
