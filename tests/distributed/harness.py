"""Run a function on P CPU processes joined by gloo (tier 2 of DESIGN section 6).

``run_group(world, fn, *args)`` calls ``fn(rank, world, *args)`` on each of ``world`` processes
joined in the default process group, and returns the list of their results. An exception on any
rank is re-raised here with that rank's traceback; a group that does not finish within
``timeout`` seconds is killed (a hang is a failure).

The gloo processes are kept for the next call of the same size (a pool: spawning a rank and
importing torch, transformers and autosp into it costs about 3.5 s a rank, 28 group runs in the
suite). Between calls each rank resets Dynamo, and the call's environment is the parent's
(``monkeypatch.setenv`` reaches the ranks). A call whose ranks may be left unlike a fresh
process (the default group made again, groups known to some ranks only) passes
``fresh=True``: it runs on processes of its own, as does every NCCL call (one GPU a rank, set
up by its environment at start). A call that fails or times out ends its pool; the
pool of 2 stays beside one of another size (at most 6 ranks alive, 8 alone: CI's 24 GiB).
"""

from __future__ import annotations

import atexit
import os
import queue as queue_mod
import tempfile
import traceback
from typing import Any

import torch.multiprocessing as mp


def _init(rank, world, store_path, backend):
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def _worker(rank, world, store_path, backend, fn, args, queue):
    import torch.distributed as dist

    try:
        _init(rank, world, store_path, backend)
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: B036 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _pool_worker(rank, world, store_path, tasks, queue):
    """A rank kept for many calls: each task is (fn, args, environment); after each, Dynamo is
    reset and the environment put back."""
    import torch
    import torch.distributed as dist

    try:
        _init(rank, world, store_path, "gloo")
    except BaseException:  # noqa: B036
        queue.put((rank, "error", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, env = task
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        try:
            queue.put((rank, "ok", fn(rank, world, *args)))
        except BaseException:  # noqa: B036
            queue.put((rank, "error", traceback.format_exc()))
        finally:
            os.environ.clear()
            os.environ.update(saved)
            torch._dynamo.reset()
    dist.destroy_process_group()


class _Pool:
    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        self.tmp = tempfile.TemporaryDirectory()
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        store = os.path.join(self.tmp.name, "store")
        self.procs = [ctx.Process(target=_pool_worker, args=(r, world, store, self.tasks[r], self.results))
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def close(self, kill: bool = False) -> None:
        for p, q in zip(self.procs, self.tasks, strict=True):
            if p.is_alive() and not kill:
                q.put(None)
        for p in self.procs:
            p.join(timeout=2 if kill else 30)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.tmp.cleanup()


_POOLS: dict[int, _Pool] = {}


def _close_pools(*worlds: int, kill: bool = False) -> None:
    for world in worlds or list(_POOLS):
        pool = _POOLS.pop(world, None)
        if pool is not None:
            pool.close(kill)


def _pool(world: int) -> _Pool:
    if world not in _POOLS:  # keep {2, one more}, at most 6 ranks
        _close_pools(*[w for w in _POOLS if sum({w, world}) > 6 or 2 not in {w, world}])
        _POOLS[world] = _Pool(world)
    return _POOLS[world]


atexit.register(_close_pools)


def _collect(results, world: int, timeout: float) -> tuple[dict[int, Any], list[str]]:
    got: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world):
            rank, status, payload = results.get(timeout=timeout)
            if status == "ok":
                got[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    except queue_mod.Empty:
        errors.append(f"the group of {world} did not finish within {timeout:.0f} s (a rank hung)")
    return got, errors


def run_group(world: int, fn, *args: Any, timeout: float = 600.0, backend: str = "gloo",
              fresh: bool = False) -> list[Any]:
    if backend != "gloo" or fresh:
        return _run_fresh(world, fn, args, timeout, backend)
    pool = _pool(world)
    env = dict(os.environ)
    for q in pool.tasks:
        q.put((fn, args, env))
    results, errors = _collect(pool.results, world, timeout)
    if errors:  # the other ranks may wait in a collective for ever: the pool ends
        _close_pools(world, kill=True)
        raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    return [results[r] for r in range(world)]


def _run_fresh(world: int, fn, args, timeout: float, backend: str) -> list[Any]:
    if backend != "gloo":
        _close_pools()  # the GPUs' memory and the host's for the NCCL ranks
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world, store_path, backend, fn, args, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        results, errors = {}, []
        try:
            results, errors = _collect(queue, world, timeout)
        finally:
            for p in procs:
                p.join(timeout=5 if errors else 60)
                if p.is_alive():
                    p.kill()
        if errors:
            raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
