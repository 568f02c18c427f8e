"""Pipeline bubble: measured idle fraction of 1F1B and interleaved 1F1B next to theory.

Every stage "computes" by sleeping a fixed time inside an autograd Function (forward t_f per stage, backward
2 t_f; a chunk of an interleaved stage sleeps 1/v of that), so the measurement isolates the schedule, the
executor and p2p (real gloo messages) from compute noise, and 2 cores are enough for 4 processes.

    bubble = 1 - (compute time of a stage) / (wall time of the step), averaged over the stages
    theory: (p - 1) / (m + p - 1) for 1F1B, (p - 1) / (v m + p - 1) for interleaved with v chunks per rank

Usage: python bench/pipeline_bubble.py [--pp 2 4] [--microbatches 4 8 16] [--chunks 2] [--forward-ms 50]
"""
from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _common import free_port, print_table
from megagpt.parallel import comm
from megagpt.parallel.state import ParallelState
from megagpt.pipeline.executor import forward_backward

LOCK_PATH = os.environ.get("MEGAGPT_TEST_LOCK", "/tmp/megagpt-distributed-tests.lock")
SHAPE = (4, 64)   # activation exchanged between stages: small, so messages cost little next to the sleeps


class _Busy(torch.autograd.Function):
    """Identity whose forward and backward each sleep a fixed time and add it to a busy-time counter."""

    @staticmethod
    def forward(ctx, x, t_fwd, t_bwd, counter):
        ctx.t_bwd, ctx.counter = t_bwd, counter
        _sleep(t_fwd, counter)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _sleep(ctx.t_bwd, ctx.counter)
        return grad, None, None, None


def _sleep(seconds: float, counter: list) -> None:
    start = time.perf_counter()
    time.sleep(seconds)
    counter[0] += time.perf_counter() - start


def _measure(ps: ParallelState, m: int, v: int, t_fwd: float, repeats: int) -> tuple[float, float]:
    """Median over repeats of (wall time of the step, slowest rank; this rank's busy time)."""
    counter = [0.0]
    base = torch.ones(SHAPE)

    def forward_step(chunk, mb, inp):
        x = base.clone().requires_grad_() if inp is None else inp
        y = _Busy.apply(x, t_fwd / v, 2 * t_fwd / v, counter)
        if ps.is_last_stage and chunk == v - 1:
            loss = y.mean()
            return loss / m, loss.detach()
        return y, None

    samples = []
    for it in range(repeats + 1):   # the first run warms up gloo connections and is dropped
        comm.all_reduce(torch.zeros(1), ps.pp_group)   # start together
        counter[0] = 0.0
        start = time.perf_counter()
        forward_backward(forward_step, m, ps, SHAPE, torch.float32, torch.device("cpu"), num_chunks=v)
        wall = torch.tensor([time.perf_counter() - start])
        comm.all_reduce_max(wall, ps.pp_group)
        if it > 0:
            samples.append((wall.item(), counter[0]))
    walls = [w for w, _ in samples]
    k = walls.index(statistics.median_low(walls))
    return samples[k]


def _worker(rank: int, world: int, port: int, cases: list, t_fwd: float, repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        ps = ParallelState(tp=1, pp=world)
        for name, m, v in cases:
            wall, busy = _measure(ps, m, v, t_fwd, repeats)
            queue.put((name, m, rank, wall, busy))
    finally:
        dist.destroy_process_group()


def run(pp: int, cases: list, t_fwd: float, repeats: int) -> dict:
    """Spawn `pp` gloo ranks, measure every case; returns {(name, m): [(wall, busy) per rank]}."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, pp, port, cases, t_fwd, repeats, queue)) for r in range(pp)]
    for p in procs:
        p.start()
    out: dict = {}
    for _ in range(pp * len(cases)):
        name, m, rank, wall, busy = queue.get()
        out.setdefault((name, m), {})[rank] = (wall, busy)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a benchmark rank exited with code {p.exitcode}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--chunks", type=int, default=2, help="model chunks per rank for the interleaved schedule")
    ap.add_argument("--forward-ms", type=float, default=50.0, help="forward time of one stage; backward is 2x")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    v = args.chunks
    rows = []
    with open(LOCK_PATH, "w") as lock:   # never time while distributed tests share the cores
        fcntl.flock(lock, fcntl.LOCK_EX)
        for pp in args.pp:
            cases = [("1F1B", m, 1) for m in args.microbatches]
            cases += [("interleaved", m, v) for m in args.microbatches if m % pp == 0]
            res = run(pp, cases, args.forward_ms / 1000, args.repeats)
            for name, m, chunks in cases:
                ranks = res[(name, m)]
                wall = max(w for w, _ in ranks.values())
                bubble = statistics.mean(1 - busy / wall for _, busy in ranks.values())
                theory = (pp - 1) / (chunks * m + pp - 1)
                ideal = (m + (pp - 1) / chunks) * 3 * args.forward_ms
                rows.append((name, pp, m, f"{wall * 1000:.1f}", f"{ideal:.1f}", f"{bubble:.3f}", f"{theory:.3f}",
                             f"{bubble - theory:+.3f}"))
    print_table(("schedule", "p", "m", "step ms", "ideal ms", "bubble", "theory", "diff"), rows,
                title=f"# t_f = {args.forward_ms:.0f} ms per stage, t_b = 2 t_f, interleaved v = {v}, "
                      f"median of {args.repeats} steps, gloo on CPU")


if __name__ == "__main__":
    main()
