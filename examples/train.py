"""Train a small byte-level Llama with sequence parallelism from autosp, then check it against eager.

Run from the repository root after ``pip install -e .``:

    torchrun --nproc-per-node=2 examples/train.py                 # sequence-parallel over 2 CPU processes (gloo)
    python examples/train.py                                      # one process, no group
    torchrun --nproc-per-node=2 examples/train.py --device cuda   # 2 GPUs (NCCL), bf16, Inductor
    torchrun --nproc-per-node=2 examples/train.py --shard-optimizer   # each rank updates half the weights

Every rank draws the same full-length batch from an identically seeded generator; autosp cuts the
sequence across the ranks itself. The model is built from a ``LlamaConfig`` with random weights
(nothing is downloaded) and reads the text in ``examples/data/`` as UTF-8 bytes (vocabulary 256).
After training, rank 0 trains a fresh copy of the same initial model on the same batches without
autosp (eager, one process) and prints the two loss curves side by side.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

import autosp

DATA = Path(__file__).resolve().parent / "data" / "alice.txt"
SEED = 0
LR = 3e-3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Dist:
    """Where this process runs: its rank, the group size and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=512, help="bytes per sequence; odd lengths are fine")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp32 on cpu, bf16 on cuda")
    p.add_argument("--shard-optimizer", action="store_true",
                   help="split the AdamW step over the ranks (autosp.ShardedOptimizer, ZeRO stage 1)")
    p.add_argument("--compiler", choices=("inductor", "aot_eager", "eager"), default=None,
                   help="autosp's inner compiler; default: aot_eager on cpu, inductor on cuda")
    args = p.parse_args()
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.compiler is None:
        args.compiler = "inductor" if args.device == "cuda" else "aot_eager"
    return args


def require_autosp_backend() -> None:
    """Fail early, with the fix, when ``backend="autosp"`` is not registered with torch.compile."""
    if not importlib.metadata.entry_points(group="torch_dynamo_backends", name="autosp"):
        raise SystemExit("the torch.compile backend 'autosp' is not registered: run `pip install -e .` "
                         "in the repository root")


def setup_distributed(device_type: str) -> Dist:
    """Join the default process group when launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    if "WORLD_SIZE" not in os.environ:
        return Dist(0, 1, torch.device(device_type))
    if device_type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def load_bytes(path: Path) -> torch.Tensor:
    """The file as a 1-D tensor of byte values (int64 token ids in [0, 256))."""
    raw = path.read_text(encoding="utf-8").encode("utf-8")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def make_batches(data: torch.Tensor, steps: int, batch_size: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches of random windows; the same on every rank (same seed, own generator)."""
    if seq_len >= data.numel():
        raise ValueError(f"--seq-len {seq_len} must be shorter than the corpus ({data.numel()} bytes)")
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq_len + 1, (batch_size,), generator=gen)
        batches.append(torch.stack([data[s : s + seq_len] for s in starts.tolist()]))
    return batches


def build_model(seq_len: int, dtype: torch.dtype, device: torch.device) -> transformers.LlamaForCausalLM:
    """A small Llama with seeded random weights: 4 layers, 4 query heads over 2 KV heads, SDPA."""
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(2048, seq_len),
        attn_implementation="sdpa",
    )
    torch.manual_seed(SEED)
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    """One step: forward on the full batch, backward, group-mean of the gradients, AdamW."""
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    autosp.reduce_gradients(model)  # no-op without a process group
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def progress_line(step: int, steps: int, loss: float, tokens_per_s: float, width: int = 20) -> str:
    done = round(width * step / steps)
    return f"[{'#' * done}{'.' * (width - done)}] step {step}/{steps} loss {loss:.4f} tok/s {tokens_per_s:,.0f}"


def train(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device,
          show_progress: bool = False, shard_optimizer: bool = False) -> list[float]:
    """Train ``model`` on ``batches`` with AdamW (with ``shard_optimizer`` and a group, each rank
    updating its share of the parameters); returns the loss of every step."""
    if shard_optimizer and dist.is_initialized() and dist.get_world_size() > 1:
        optimizer = autosp.ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=LR)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step, ids in enumerate(batches, start=1):
        start = time.perf_counter()
        losses.append(train_step(model, optimizer, ids.to(device)))  # .item() waits for the device
        if show_progress:
            elapsed = time.perf_counter() - start
            print(progress_line(step, len(batches), losses[-1], ids.numel() / elapsed), flush=True)
    return losses


def comparison_table(with_sp: list[float], without: list[float]) -> str:
    """Loss with and without autosp at a few steps (first, middle, last), and the largest gap."""
    n = len(with_sp)
    rows = sorted({0, 1, n // 4, n // 2, (3 * n) // 4, n - 1} & set(range(n)))
    lines = [f"{'step':>6}  {'autosp':>10}  {'eager':>10}  {'|diff|':>10}"]
    for i in rows:
        lines.append(f"{i + 1:>6}  {with_sp[i]:>10.6f}  {without[i]:>10.6f}  {abs(with_sp[i] - without[i]):>10.2e}")
    worst = max(abs(a - b) for a, b in zip(with_sp, without, strict=True))
    lines.append(f"max |diff| over {n} steps: {worst:.2e}")
    return "\n".join(lines)


def explain_head(model: torch.nn.Module, ids: torch.Tensor, lines: int = 24) -> str:
    """The first lines of autosp's report for ``model`` (an uncompiled copy) on this batch."""
    report = autosp.explain(model, input_ids=ids, labels=ids, use_cache=False)
    text = str(report).splitlines()
    more = f"\n  ... ({len(text) - lines} more lines)" if len(text) > lines else ""
    return "\n".join(text[:lines]) + more


def main() -> None:
    args = parse_args()
    require_autosp_backend()
    env = setup_distributed(args.device)
    dtype = DTYPES[args.dtype]

    data = load_bytes(DATA)
    batches = make_batches(data, args.steps, args.batch_size, args.seq_len, seed=SEED)
    model = build_model(args.seq_len, dtype, env.device)
    reference = copy.deepcopy(model)  # the initial weights, for the run without autosp

    if env.is_main:
        params = sum(p.numel() for p in model.parameters())
        print(f"autosp {autosp.__version__}: {env.world} process(es) on {args.device}, {args.dtype}, "
              f"compiler {args.compiler}; Llama with {params / 1e6:.2f}M parameters; "
              f"{args.steps} steps of {args.batch_size} x {args.seq_len} bytes from {DATA.name} ({data.numel():,} bytes)")
        print(explain_head(reference, batches[0].to(env.device)), flush=True)

    model = torch.compile(model, backend="autosp", options={"compiler": args.compiler})
    losses = train(model, batches, env.device, show_progress=env.is_main, shard_optimizer=args.shard_optimizer)

    if dist.is_initialized():
        dist.destroy_process_group()
    if env.is_main:
        print("training the same initial model on the same batches without autosp (eager, one process) ...",
              flush=True)
        reference_losses = train(reference, batches, env.device)
        print(comparison_table(losses, reference_losses))


if __name__ == "__main__":
    main()
