"""The explain report: readable text, an HTML page with each pass before and after, dump_dir."""

from __future__ import annotations

import torch

import autosp
from tests.harness_fake import fake_group
from tests.passes.models_tiny import tiny_llama


def _ids():
    return torch.randint(0, 128, (1, 17), generator=torch.Generator().manual_seed(0))


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
    for name in ("find_attention", "infer_sequence", "global_loss", "shard_sequence", "output_layout"):
        assert name in html
    assert "<th>before</th>" in html and "<th>after</th>" in html and "seq_to_head" in html


def test_dump_dir_writes_the_report(tmp_path):
    torch._dynamo.reset()
    model = tiny_llama()
    ids = _ids()
    compiled = torch.compile(model, backend=autosp.backend(compiler="eager", dump_dir=str(tmp_path)))
    with torch.no_grad():
        compiled(input_ids=ids, labels=ids, use_cache=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith(".txt") for f in files) and any(f.endswith(".html") for f in files), files
    text = next(p for p in tmp_path.iterdir() if p.suffix == ".txt").read_text()
    assert "sequence-parallel group of 1" in text
