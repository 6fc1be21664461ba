"""The explain report: what the compiler did to each region, for a person to read in a minute.

``print(report)`` for the terminal; ``report.save_html(path)`` for a page with each pass's graph
before and after, side by side.
"""

from __future__ import annotations

import difflib
import html
import os
from dataclasses import dataclass

from autosp.graph_utils import human_bytes as _bytes
from autosp.plan import Plan


@dataclass
class Report:
    plans: list[Plan]

    def __str__(self) -> str:
        return "\n\n".join(_plan_text(p) for p in self.plans) or "autosp: nothing was compiled"

    def save_text(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(str(self) + "\n")

    def save_html(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(_html(self.plans))


def save_report(plan: Plan) -> None:
    """Write the region's report (text and HTML) to its ``Config.dump_dir``, if one is set."""
    dump_dir = plan.options.get("dump_dir")
    if dump_dir is None:
        return
    os.makedirs(dump_dir, exist_ok=True)
    stem = os.path.join(dump_dir, f"autosp_region_{plan.region.replace('/', '_')}_rank{plan.rank}")
    report = Report([plan])
    report.save_text(stem + ".txt")
    report.save_html(stem + ".html")


def _plan_text(p: Plan) -> str:
    out = [f"autosp region {p.region}: sequence-parallel group of {p.world} (this is rank {p.rank})"]
    if p.seq_len is not None:
        out[0] += f", S = {p.seq_len}"
    out.append("attention sites:")
    out += [f"  {s.node}: {s.kind}; {s.detail} -> {'rewritten' if s.rewritten else 'left alone'}" for s in p.sites] or ["  none"]
    if p.inputs:
        out.append("inputs (Full; cut to the local shard where float work begins):")
        out += [f"  {i}" for i in p.inputs]
    if p.cuts:
        out.append("cuts (local slices, no communication):")
        out += [f"  {c.node}: {c.detail}" for c in p.cuts]
    if p.collectives:
        out.append("collectives per step (bytes this rank sends in the forward; the backward sends as many):")
        out += [f"  {c.node}: {c.kind:<16} {_bytes(c.bytes_per_step):>10}  {c.detail}" for c in p.collectives]
        out.append(f"  total {_bytes(p.collective_bytes())} in {len(p.collectives)} collectives")
    out.append("fallbacks (ops run on the full sequence after a gather):")
    out += [f"  {f.node} ({f.op}): {f.reason}" for f in p.fallbacks] or ["  none"]
    if p.outputs:
        out.append("outputs:")
        out += [f"  {o}" for o in p.outputs]
    if p.notes:
        out.append("notes:")
        out += [f"  {n}" for n in p.notes]
    out.append("passes: " + ", ".join(f"{name} ({_delta(b, a)})" for name, b, a in p.passes))
    return "\n".join(out)


def _delta(before: str, after: str) -> str:
    if before == after:
        return "unchanged"
    b, a = before.count("\n"), after.count("\n")
    return f"{a - b:+d} lines"


def _html(plans: list[Plan]) -> str:
    parts = [
        "<!doctype html><meta charset=utf-8><title>autosp explain</title><style>"
        "body{font-family:sans-serif;margin:1em}pre{font-size:11px;white-space:pre;overflow:auto;"
        "max-height:40em;border:1px solid #ccc;padding:4px;margin:0}table{width:100%;table-layout:fixed}"
        "td{vertical-align:top;width:50%}.add{background:#dfd}.del{background:#fdd}</style>"
    ]
    for p in plans:
        parts.append(f"<h2>Region {html.escape(str(p.region))}</h2><pre>{html.escape(_plan_text(p))}</pre>")
        if p.memory.get("timeline"):
            parts.append(_timeline_svg(p.memory))
        for name, before, after in p.passes:
            parts.append(f"<h3>pass {html.escape(name)}: {_delta(before, after)}</h3>")
            if before == after:
                continue
            left, right = _side_by_side(before, after)
            parts.append(f"<table><tr><th>before</th><th>after</th></tr><tr><td><pre>{left}</pre></td>"
                         f"<td><pre>{right}</pre></td></tr></table>")
    return "\n".join(parts)


def _timeline_svg(memory: dict, width: int = 800, height: int = 200) -> str:
    """The planner's memory picture: estimated live bytes along the forward graph (before the
    partitioner), against the budget, the predicted peak of the step and, once a step ran on a
    GPU, the measured peak after its forward."""
    timeline, budget, peak = memory["timeline"], memory["budget"], memory["predicted_peak"]
    measured = memory.get("measured_forward_peak")
    top = max(max(timeline), peak, measured or 0, min(budget, 2 * max(max(timeline), peak))) * 1.05 or 1

    def y(v: float) -> float:
        return height - v / top * height

    step = width / max(1, len(timeline) - 1)
    points = " ".join(f"{i * step:.1f},{y(v):.1f}" for i, v in enumerate(timeline))
    lines = [f'<polyline points="{points}" fill="none" stroke="#36c" stroke-width="1.5"/>']
    marks = [(budget, "#c33", "budget"), (peak, "#e90", "predicted peak of the step")]
    if measured is not None:
        marks.append((measured, "#393", "measured peak after the first forward"))
    for value, color, label in marks:
        if value <= top:
            lines.append(f'<line x1="0" x2="{width}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="{color}" '
                         f'stroke-dasharray="4 3"/><text x="4" y="{y(value) - 3:.1f}" font-size="11" '
                         f'fill="{color}">{label} {_bytes(value)}</text>')
    return (f"<h3>memory timeline (estimated live bytes along the forward graph, max {_bytes(max(timeline))})</h3>"
            f'<svg width="{width}" height="{height}" style="border:1px solid #ccc">{"".join(lines)}</svg>')


def _side_by_side(before: str, after: str) -> tuple[str, str]:
    b, a = before.splitlines(), after.splitlines()
    left, right = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, b, a, autojunk=False).get_opcodes():
        for line in b[i1:i2]:
            left.append(html.escape(line) if tag == "equal" else f"<span class=del>{html.escape(line)}</span>")
        for line in a[j1:j2]:
            right.append(html.escape(line) if tag == "equal" else f"<span class=add>{html.escape(line)}</span>")
    return "\n".join(left), "\n".join(right)
