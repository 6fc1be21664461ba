"""What holds the GPU memory at a step's peak: one autosp step under the allocator's history.

Runs one training step of the benchmark's model (``sp_throughput.llama_config``) on one GPU with
the autosp backend and the given options, recording every allocation (torch's memory history,
Python stacks). Then it replays the trace to the moment the allocated bytes peak and prints the
blocks alive there, grouped by the line that asked for them: for Inductor's output code that
line names the buffer and the kernel; the phase (forward or backward) is read from the stack.

  python benchmarks/memory_breakdown.py --seq 262144 --layers 2 \
      --options recompute=full+tile_mlp=8+offload=True [--out $OUT/mem]

Writes the report to stdout (and ``--out``/breakdown.txt with the snapshot pickle beside it).
"""

from __future__ import annotations

import argparse
import collections
import linecache
import os
import pickle
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _where(frames: list[dict]) -> tuple[str, str]:
    """(phase, the line that allocated): the innermost frame in generated or user code."""
    phase = "backward" if any("backward" in f["name"].lower() for f in frames) else "forward"
    for f in frames:
        name = f["filename"]
        if "torchinductor" in name or "/autosp/" in name or "benchmarks" in name:
            text = linecache.getline(name, f["line"]).strip() if os.path.exists(name) else ""
            return phase, f"{os.path.basename(name)}:{f['line']} {f['name']}: {text[:150]}"
    f = frames[0] if frames else {"filename": "?", "line": 0, "name": "?"}
    return phase, f"{f['filename']}:{f['line']} {f['name']}"


def live_at_peak(trace: list[dict], end: int | None = None) -> tuple[int, list[dict], int]:
    """Replay alloc / free_completed events (up to event ``end``): (peak bytes, the blocks alive
    then, event index)."""
    live: dict[int, dict] = {}
    total = peak = at = 0
    snapshot: list[dict] = []
    for i, e in enumerate(trace[:end]):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
            if total > peak:
                peak, at, snapshot = total, i, list(live.values())
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
    return peak, snapshot, at


def first_backward(trace: list[dict]) -> int | None:
    """The index of the first allocation made in the backward (None: there is none)."""
    return next((i for i, e in enumerate(trace) if e["action"] == "alloc"
                 and _where(e.get("frames", []))[0] == "backward"), None)


def report(trace: list[dict], top: int = 40, end: int | None = None) -> str:
    peak, blocks, at = live_at_peak(trace, end)
    groups: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for b in blocks:
        groups[_where(b.get("frames", []))].append(b["size"])
    phase_now = _where(trace[at].get("frames", []))[0] if trace else "?"
    lines = [f"peak {peak / 2**30:.2f} GiB in the {phase_now} (event {at} of {len(trace)}), "
             f"{len(blocks)} blocks alive; by allocating line (GiB, count):"]
    for (phase, where), sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"  {sum(sizes) / 2**30:8.2f}  x{len(sizes):<4} [{phase}] {where}")
    return "\n".join(lines)


def main() -> None:
    import torch
    from sp_throughput import llama_config, parse_options, train_step
    from transformers import LlamaForCausalLM

    import autosp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=262144)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--options", default="recompute=full+tile_mlp=8+offload=True")
    p.add_argument("--model", default="", help="LlamaConfig fields over the benchmark's shape, "
                   "e.g. hidden_size=1024+intermediate_size=2816+num_key_value_heads=2")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("memory_breakdown needs a CUDA GPU (the allocator's history is a CUDA feature)")
    more = parse_options(args.options)
    cfg = llama_config(False, args.layers)
    for key, value in parse_options(args.model).items():
        if not hasattr(cfg, key):
            raise SystemExit(f"--model: LlamaConfig has no field {key!r}")
        setattr(cfg, key, value)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    compiled = torch.compile(model, backend=autosp.backend(logits="drop", **more), dynamic=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(args.seq)).cuda()
    train_step(compiled, model, opt, ids, "single-autosp")  # compile, and Adam's state exists
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
    train_step(compiled, model, opt, ids, "single-autosp")
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][torch.cuda.current_device()]
    text = (f"seq {args.seq}, {args.layers} layers, options {args.options}; max_memory_allocated "
            f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (the second step; the replay counts "
            f"from the history's start, blocks allocated before it are not in it)\n" + report(trace)
            + "\n\nthe forward alone:\n" + report(trace, top=20, end=first_backward(trace)))
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "breakdown.txt"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "snapshot.pickle"), "wb") as f:
            pickle.dump(snap, f)


if __name__ == "__main__":
    main()
