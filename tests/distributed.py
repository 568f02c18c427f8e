"""Run a test function on N gloo processes on this machine.

Usage: ``results = run_distributed(fn, world_size, *args)``. ``fn(*args)`` runs in every rank with
``torch.distributed`` initialised (gloo, spawn start method); its return values come back as a list
indexed by rank. An exception in any rank is re-raised here with the child's traceback.

Multi-process runs take a machine-wide file lock so that concurrent pytest sessions on this
2-core machine never run two process groups at once.
"""
from __future__ import annotations

import fcntl
import os
import pickle
import queue as queue_module
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megagpt.parallel.launch import free_port

LOCK_PATH = os.environ.get("MEGAGPT_TEST_LOCK", "/tmp/megagpt-distributed-tests.lock")
DEFAULT_TIMEOUT_S = 300


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=DEFAULT_TIMEOUT_S))
        result = fn(*args)
        # Plain pickle: tensors travel by value, not as shared-memory handles that die with this process.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_once(fn: Callable, world_size: int, args: tuple, timeout_s: float) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    # Drain the queue while waiting: a child blocks in put() on a large result until the parent reads it.
    while len(results) + len(errors) < world_size and time.monotonic() < deadline:
        try:
            rank, status, payload = queue.get(timeout=0.5)
        except queue_module.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # a rank died without reporting (killed, segfault)
            continue
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
        if errors:  # other ranks may be blocked on the failed one: collect what else arrives shortly
            deadline = min(deadline, time.monotonic() + 2.0)
    for p in procs:
        p.join(5 if not errors and len(results) == world_size else 0.5)
        if p.is_alive():
            p.kill()
    if errors:
        report = "\n".join(f"--- rank {r} ---\n{errors[r]}" for r in sorted(errors))
        raise RuntimeError(f"ranks {sorted(errors)} of {world_size} failed:\n{report}")
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        raise RuntimeError(f"ranks {missing} of {world_size} produced no result (exit codes {codes}; hang, crash "
                           f"or timeout after {timeout_s}s)")
    return [results[r] for r in range(world_size)]


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return the per-rank results."""
    with open(LOCK_PATH, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for attempt in range(3):
            try:
                return _run_once(fn, world_size, args, timeout_s)
            except RuntimeError as exc:  # a port taken between probing and binding: retry on a new one
                if "address already in use" not in str(exc).lower() or attempt == 2:
                    raise
    raise AssertionError("unreachable")


def run_checks(checks: dict[str, Callable]) -> dict[str, Optional[str]]:
    """Run every `check(group, rank, world_size)` on this rank; None for a pass, else the (trimmed) traceback.

    For suites that start gloo once and run many checks inside it. Checks finish their collectives before
    asserting, so a failure on some ranks leaves the ranks in step; a sum of check indices after each check
    proves it (else the remaining results would be meaningless).
    """
    n, r = dist.get_world_size(), dist.get_rank()
    group = dist.new_group(list(range(n)))
    results: dict[str, Optional[str]] = {}
    for i, (name, check) in enumerate(checks.items()):
        try:
            check(group, r, n)
            results[name] = None
        except Exception:  # noqa: BLE001 - report per check
            results[name] = traceback.format_exc()[-1500:]
        step = torch.tensor([float(i)])
        dist.all_reduce(step, group=group)
        if step.item() != i * n:
            raise RuntimeError(f"ranks out of step after check {name!r}: {results[name]}")
    return results


def assert_check_passed(rank_results: list[dict[str, Optional[str]]], name: str) -> None:
    """Fail with every rank's traceback for check `name`."""
    errors = [f"rank {r}:\n{res[name]}" for r, res in enumerate(rank_results) if res[name] is not None]
    assert not errors, "\n".join(errors)
