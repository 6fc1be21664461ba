"""A GPU-free estimate of a step's peak activation memory: the buffers of Inductor's own code.

Compiles one training step of the benchmark's model shape (real widths, 2 layers by default, a short
sequence, a small vocabulary) with the autosp backend and Inductor on CPU, over 2 gloo processes
by default, and replays the generated ``call()`` of the forward and of the backward: each
``empty_strided`` allocation, each buffer handed on (``# reuse``), each ``del``. Only buffers with
a sequence-sized dimension count (weights and their gradients are left out), in units of one
``[S/P, hidden]`` bf16 buffer, so the figure scales to long sequences: at S/P = 256K a unit is
1 GiB. Kernels' private workspaces (cuDNN's) are not in the code and not counted.

  python benchmarks/inductor_peak.py --seq 1536 --options recompute=full+tile_mlp=8+offload=True [+buffer_reuse=False]
  python benchmarks/inductor_peak.py --seq 1536 --layers 3 --as-if-tokens 262144 --options ...
  python benchmarks/inductor_peak.py ... --emulated --dump DIR   # rank 0 on a fake group, in one process

``--emulated`` compiles as ``sp_throughput.py``'s ``emulated-autosp`` mode does. Its ``call()`` is
the real rank 0's, line for line (2026-11-29, 2 layers, attention_out with the long-sequence
options; tests/test_benchmark_dry_run.py keeps it so).

Passes that weigh estimated compute time against a fixed minimum (rematerialize across a long
stretch, the offload pass's second reload) see none at a short sequence; ``--as-if-tokens``
scales that minimum so they decide as at that many tokens a rank (their other thresholds are
ratios of times that all grow with the length).

Pick a sequence whose shard and its tiles and chunks differ from the model's widths (1536 over 2
ranks: 768, tiles of 96 or 48; heads 32, head size 64, hidden 2048, KV 512).

Against the GPU (2026-11-28): the backward's estimate for the options above, 17.5 units, and
the 2x H200 run at S/P = 256K (one unit: 1 GiB): 28.68 GiB peak, less 11.2 GiB of parameters,
gradients and AdamW states, is 17.5 GiB.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ITEM = {"torch.bfloat16": 2, "torch.float16": 2, "torch.float32": 4, "torch.int64": 8, "torch.int32": 4,
        "torch.bool": 1, "torch.uint8": 1}


def _dims(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip().lstrip("-").isdigit()]


def replay(code: str, tokens: int, hidden: int, pieces: tuple[int, ...] = (), stop: str | None = None) -> dict:
    """Live bytes along the ``call()`` of one Inductor output code. Counts buffers with a dimension
    that is a multiple of ``tokens`` (S/P) or one of ``pieces`` (an MLP tile's or an attention
    chunk's length); inputs from the start
    to their ``del`` (but the offloaded ones, read through ``autosp::reload``: host memory);
    outputs of extern kernels from their size assertion. Returns the peak in
    units of ``tokens * hidden`` bf16 bytes, its line, and the buffers alive there; with ``stop``,
    also what is alive (``at_stop``, units) when the first line containing ``stop`` is reached."""
    unit = tokens * hidden * 2
    body = code[code.index("def call(self, args):"):]
    lines = body.splitlines()

    def nbytes(shape: str, stride: str, item: int) -> int:
        dims, strides = _dims(shape), _dims(stride)
        if not any(d % tokens == 0 or d in pieces for d in dims):
            return 0
        extent = 1 + sum((d - 1) * s for d, s in zip(dims, strides, strict=False)) if strides else math.prod(dims)
        return max(extent, 1) * item

    owner: dict[str, int] = {}
    made: dict[str, str] = {}
    on_host = set(re.findall(r"torch\.ops\.autosp\.reload\.default\((\w+),", body))  # offloaded: in host memory
    for line in lines:  # inputs are alive from the start
        m = re.match(r"\s*assert_size_stride\((\w+), \(([^)]*)\), \(([^)]*)\), 'input'\)", line)
        if m and m.group(1) not in on_host:
            owner[m.group(1)], made[m.group(1)] = nbytes(m.group(2), m.group(3), 2), "input"
    pending: dict[str, str] = {}
    peak = (sum(owner.values()), 0, dict(owner))
    at_stop = None
    for i, line in enumerate(lines):
        s = line.strip()
        if stop is not None and at_stop is None and stop in s:
            at_stop = sum(owner.values()) / unit
        if m := re.match(r"(\w+) = empty_strided_\w+\(\(([^)]*)\), \(([^)]*)\), (torch\.\w+)\)", s):
            owner[m.group(1)], made[m.group(1)] = nbytes(m.group(2), m.group(3), ITEM.get(m.group(4), 2)), s
        elif (m := re.match(r"(\w+) = (?:reinterpret_tensor\()?(\w+)\b.*; del (\w+)\s+# reuse", s)) and \
                m.group(2) == m.group(3) and m.group(2) in owner:
            owner[m.group(1)] = owner.pop(m.group(2))
            made[m.group(1)] = made.get(m.group(2), "") + " (handed on)"
        elif (m := re.match(r"(\w+) = (torch\.ops\.[\w.]+|extern_kernels\.[\w.]+|\w+\[\d+\])", s)) and \
                "reinterpret_tensor" not in s:
            pending[m.group(1)] = s
        elif (m := re.match(r"assert_size_stride\((\w+), \(([^)]*)\), \(([^)]*)\), '(?!input)", s)) and m.group(1) in pending:
            owner[m.group(1)], made[m.group(1)] = nbytes(m.group(2), m.group(3), 2), pending.pop(m.group(1))
        elif (m := re.match(r"del (\w+)$", s)) and m.group(1) in owner:
            owner.pop(m.group(1))
        total = sum(owner.values())
        if total > peak[0]:
            peak = (total, i, dict(owner))
    alive = sorted(((b / unit, n, made.get(n, "")) for n, b in peak[2].items() if b), reverse=True)
    return {"peak_units": peak[0] / unit, "line": lines[peak[1]].strip(), "alive": alive, "at_stop": at_stop}


def _worker(rank: int, world: int, args) -> list[str]:
    import torch
    from sp_throughput import parse_options
    from torch._inductor.utils import run_and_get_code
    from transformers import LlamaConfig, LlamaForCausalLM

    import autosp

    if args.as_if_tokens:  # decide "long compute" as at that many tokens a rank: times scale with S/P
        from autosp.passes import offload, rematerialize

        factor = (args.seq // world) / args.as_if_tokens
        offload.MIN_STRETCH_S *= factor
        rematerialize.MIN_STRETCH_S *= factor
    cfg = LlamaConfig(vocab_size=1000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=8, attn_implementation="sdpa",
                      max_position_embeddings=1 << 16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
    more = {"check_plan": False} if args.emulated else {}  # the plan agreement gathers nothing on a fake group
    compiled = torch.compile(model, backend=autosp.backend(compiler="inductor", logits="drop", **more,
                                                           **parse_options(args.options)), dynamic=False)

    def step():
        compiled(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    _, code = run_and_get_code(step)
    if rank == 0 and args.dump:
        os.makedirs(args.dump, exist_ok=True)
        for i, c in enumerate(code):
            with open(os.path.join(args.dump, f"code_{i}.py"), "w") as f:
                f.write(c)
    return code if rank == 0 else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=1536, help="global sequence length (a multiple of 8 x nproc)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--options", default="recompute=full+tile_mlp=8+offload=True")
    p.add_argument("--as-if-tokens", type=int, default=None,
                   help="passes that weigh compute against a fixed minimum (rematerialize's and the reload "
                        "pass's long stretches) decide as at this many tokens a rank (e.g. 262144)")
    p.add_argument("--dump", default=None, help="write rank 0's generated code (forward, backward) here")
    p.add_argument("--emulated", action="store_true",
                   help="one process as rank 0 of --nproc on a fake process group, as sp_throughput's "
                        "emulated-autosp mode runs (compare its --dump with a real run's)")
    args = p.parse_args()
    sys.path[:0] = [ROOT, HERE]
    from sp_throughput import parse_options

    from tests.distributed.harness import run_group

    tokens = args.seq // args.nproc
    options = parse_options(args.options)
    pieces = (tokens // options.get("tile_mlp", 1), args.seq // options.get("attention_chunks", 1),
              tokens // options.get("attention_chunks", 1))
    if args.emulated:
        from autosp._torch_private import init_fake_process_group

        init_fake_process_group(rank=0, world_size=args.nproc)
        codes = _worker(0, args.nproc, args)
    else:
        codes = run_group(args.nproc, _worker, args, timeout=3600)[0]
    for name, code in zip(("forward", "backward"), codes, strict=False):
        r = replay(code, tokens, 2048, pieces)
        print(f"{name}: peak {r['peak_units']:.2f} units of [S/P={tokens}, 2048] bf16, at `{r['line'][:100]}`")
        for units, buf, made in r["alive"][:16]:
            print(f"  {units:5.2f}  {buf:12s} {made[:110]}")


if __name__ == "__main__":
    main()
