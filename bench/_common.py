"""Helpers shared by the benchmarks: table printing, machine load, the fp32 matmul ceiling, a one-rank process group.

Benchmarks are scripts that print tables; nothing here asserts on timings.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megagpt.diagnostics.hardware import matmul_rate  # noqa: E402,F401 (benchmarks import it from here)
from megagpt.parallel.launch import free_port  # noqa: E402,F401 (benchmarks import it from here)


def device_matmul_rate(dtype: torch.dtype, n: int = 8192, reps: int = 20) -> tuple[float, float, int]:
    """Best FLOP/s of an n x n torch.mm on the current CUDA device (CUDA events after a warm-up), in
    matmul_rate's (wall, CPU, n) form: the ceiling an MFU figure is measured against in the same run."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    rate = 2 * n ** 3 / best
    return rate, rate, n


def single_rank_env() -> None:
    """Environment of a torchrun launch with one rank, so `megagpt.training.setup` joins a 1-rank gloo group."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def load_average() -> str:
    """1/5/15-minute load averages and the core count: on a shared 2-core box, timings mean little without it."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unavailable"
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"


def time_calls(fn: Callable[[], object], warmup: int, iters: int) -> tuple[list[float], list[float]]:
    """Wall seconds and process CPU seconds of each of `iters` calls of `fn` after `warmup` untimed calls.

    CPU seconds / threads is the time the call would take if it had the cores to itself: on a shared machine
    it is far steadier than wall time (it still includes OpenMP spin-waits and cache interference).
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> None:
    """A plain fixed-width table (first column left-aligned, the others right-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    if title:
        print(title)
    print(fmt(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(fmt(row))
    print(flush=True)
