"""Run a function on P CPU processes joined by gloo (tier 2 of DESIGN section 6).

``run_group(world, fn, *args)`` spawns ``world`` processes, initializes the default process
group with gloo (or NCCL, one GPU a rank, with ``backend="nccl"``) through a file store, calls ``fn(rank, world, *args)`` on each and returns the
list of their results. An exception on any rank is re-raised here with that rank's traceback;
a group that does not finish within ``timeout`` seconds is killed (a hang is a failure).
"""

from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any

import torch.multiprocessing as mp


def _worker(rank, world, store_path, backend, fn, args, queue):
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: B036 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_group(world: int, fn, *args: Any, timeout: float = 600.0, backend: str = "gloo") -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world, store_path, backend, fn, args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors = []
        try:
            for _ in range(world):
                rank, status, payload = queue.get(timeout=timeout)
                if status == "ok":
                    results[rank] = payload
                else:
                    errors.append(f"rank {rank}:\n{payload}")
                    break
        except Exception as e:  # queue.Empty: a rank hung
            errors.append(f"the group of {world} did not finish within {timeout:.0f} s ({type(e).__name__})")
        finally:
            for p in procs:
                p.join(timeout=5 if errors else 60)
                if p.is_alive():
                    p.kill()
        if errors:
            raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
