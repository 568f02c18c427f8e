"""Pipeline bubble: measured idle fraction of 1F1B, interleaved, ZB-H1 and ZB-V next to theory, the activation
bytes each stage holds, and a per-instruction timeline.

Every stage "computes" by sleeping fixed times, so the measurement isolates the schedule, the executor and p2p
(real gloo messages) from compute noise, and 2 cores are enough for 4 processes. A stage (chunk) is
`linear(x, weight)` (parallel/layers.py's deferrable linear, a tiny GEMM) followed by an autograd Function that
sleeps t_f in forward and t_f in backward; the weight's grad hook sleeps another t_f when its gradient arrives.
So a whole backward takes 2 t_f as before, and a split backward is B = t_f (input grads) then W = t_f (the
deferred weight grad: the real queue of parallel/layers.py, whose autograd call fires the hook). A chunk of a
two-chunk schedule sleeps half of each.

    bubble = 1 - (compute time of a stage) / (wall time of the step), averaged over the stages
    theory (F = B = W): 1F1B (p - 1) / (m + p - 1); interleaved (p - 1) / (v m + p - 1);
                        ZB-H1 (p - 1) / (3m + p - 1); ZB-V (p - 1) / (6m + p - 1) (p <= 4, see zero_bubble.py)

Saved bytes: each micro-batch's forward holds 2 A bytes until its backward (the linear's input is a view into an
A-byte buffer, which a deferred W also keeps, and A more in the sleeping Function, freed by B), like a transformer layer whose W needs
about half of its activations. The peak per stage of live held bytes is reported in units of one stage
micro-batch's 2 A (a chunk of a two-chunk schedule holds half).

Usage: python bench/pipeline_bubble.py [--pp 2 4] [--microbatches 4 8 16] [--chunks 2] [--forward-ms 50]
"""
from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import time
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _common import free_port, print_table
from megagpt.parallel import comm
from megagpt.parallel.layers import linear
from megagpt.parallel.state import ParallelState
from megagpt.pipeline.executor import forward_backward

LOCK_PATH = os.environ.get("MEGAGPT_TEST_LOCK", "/tmp/megagpt-distributed-tests.lock")
SHAPE = (4, 64)   # activation exchanged between stages: small, so messages cost little next to the sleeps
A_BYTES = 256 * 1024   # activation bytes a stage micro-batch holds twice over (see the module docstring)
SCHEDULES = {"1F1B": (None, 1), "interleaved": ("interleaved", None), "ZB-H1": ("zb-h1", 1), "ZB-V": ("zb-v", 2)}
SYMBOL = {"forward": "F", "backward": "b", "backward_input": "B", "backward_weight": "W"}


class _InBuffer(torch.autograd.Function):
    """Identity whose output is a view into a fresh buffer of A bytes: whoever saves the output holds A bytes."""

    @staticmethod
    def forward(ctx, x, track, nbytes):
        buffer = track(torch.empty(nbytes // 4))
        out = buffer[:x.numel()].view_as(x)
        out.copy_(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _Busy(torch.autograd.Function):
    """Identity whose forward and backward each sleep a fixed time; it holds `held` until its backward."""

    @staticmethod
    def forward(ctx, x, seconds, counter, held):
        ctx.seconds, ctx.counter, ctx.held = seconds, counter, held
        _sleep(seconds, counter)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _sleep(ctx.seconds, ctx.counter)
        return grad, None, None, None


def _sleep(seconds: float, counter: list) -> None:
    start = time.perf_counter()
    time.sleep(seconds)
    counter[0] += time.perf_counter() - start


class _Stage:
    """The toy stage of every chunk on one rank, with its busy-time counter and live held-bytes tracker."""

    def __init__(self, ps: ParallelState, m: int, v: int, t_op: float) -> None:
        self.ps, self.m, self.v, self.t_op = ps, m, v, t_op
        self.busy, self.live, self.peak = [0.0], [0], [0]
        self.weights = [torch.nn.Parameter(torch.eye(SHAPE[1])) for _ in range(v)]
        for w in self.weights:
            w.register_post_accumulate_grad_hook(self._weight_hook)

    def _weight_hook(self, p: torch.Tensor) -> None:
        if p.grad is not None:          # None: B ran with the weight grad deferred; W brings it later
            _sleep(self.t_op, self.busy)
            p.grad = None

    def _held(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.untyped_storage().nbytes()
        self.live[0] += nbytes
        self.peak[0] = max(self.peak[0], self.live[0])
        weakref.finalize(t, self._free, nbytes)
        return t

    def _free(self, nbytes: int) -> None:
        self.live[0] -= nbytes

    def forward_step(self, chunk: int, mb: int, inp):
        x = torch.ones(SHAPE, requires_grad=True) if inp is None else inp
        nbytes = A_BYTES // self.v                                            # a chunk holds 1/v of a stage
        y = linear(_InBuffer.apply(x, self._held, nbytes), self.weights[chunk])   # [4, 64]; input kept for W
        y = _Busy.apply(y, self.t_op, self.busy, self._held(torch.empty(nbytes // 4)))
        if self.ps.is_last_stage and chunk == self.v - 1:
            loss = y.mean()
            return loss / self.m, loss.detach()
        return y, None


def _measure(ps: ParallelState, m: int, v: int, schedule, t_fwd: float, repeats: int):
    """Median over repeats of (wall time of the step, slowest rank; this rank's busy time; peak held bytes;
    timeline of (op, mb, chunk, start, end) with comm batches as op "comm")."""
    stage = _Stage(ps, m, v, t_fwd / v)
    samples = []
    for it in range(repeats + 1):   # the first run warms up gloo connections and is dropped
        comm.all_reduce(torch.zeros(1), ps.pp_group)   # start together
        stage.busy[0], stage.peak[0] = 0.0, stage.live[0]
        events: list[list] = []

        def on_instruction(ins) -> None:
            now = time.perf_counter() - start
            if events:
                events[-1][4] = now
            op = "comm" if ins.is_comm else ins.op
            if not (op == "comm" and events and events[-1][0] == "comm"):
                events.append([op, ins.microbatch, ins.chunk, now, now])
        start = time.perf_counter()
        forward_backward(stage.forward_step, m, ps, SHAPE, torch.float32, torch.device("cpu"), num_chunks=v,
                         on_instruction=on_instruction, schedule=schedule)
        end = time.perf_counter() - start
        events[-1][4] = end
        wall = torch.tensor([end])
        comm.all_reduce_max(wall, ps.pp_group)
        if it > 0:
            samples.append((wall.item(), stage.busy[0], stage.peak[0], events))
    walls = [s[0] for s in samples]
    return samples[walls.index(statistics.median_low(walls))]


def _worker(rank: int, world: int, port: int, cases: list, t_fwd: float, repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        states = {None: ParallelState(tp=1, pp=world), "zb-v": ParallelState(tp=1, pp=world, pipeline_schedule="zb-v")}
        for name, m, v, schedule in cases:
            ps = states["zb-v" if schedule == "zb-v" else None]
            queue.put((name, m, rank, *_measure(ps, m, v, schedule, t_fwd, repeats)))
    finally:
        dist.destroy_process_group()


def run(pp: int, cases: list, t_fwd: float, repeats: int) -> dict:
    """Spawn `pp` gloo ranks, measure every case; returns {(name, m): {rank: (wall, busy, peak, events)}}."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, pp, port, cases, t_fwd, repeats, queue)) for r in range(pp)]
    for p in procs:
        p.start()
    out: dict = {}
    for _ in range(pp * len(cases)):
        name, m, rank, *result = queue.get()
        out.setdefault((name, m), {})[rank] = tuple(result)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a benchmark rank exited with code {p.exitcode}")
    return out


def theory(name: str, p: int, m: int, v: int) -> float:
    work = {"1F1B": m, "interleaved": v * m, "ZB-H1": 3 * m, "ZB-V": 6 * m}[name]
    return (p - 1) / (work + p - 1)


def timeline(ranks: dict, t_fwd: float, width_ms: float) -> list[str]:
    """One text line per rank: a character per `width_ms` slot, F/B/W (b: a whole backward), '~' inside a p2p
    batch (waiting for a neighbour), ' ' anything else; upper case marks chunk 0, lower case chunk 1 (two-chunk
    schedules). A W in a slot where 1F1B shows '~' is the deferred weight gradient filling a p2p wait."""
    lines = []
    for rank in sorted(ranks):
        events = ranks[rank][3]
        slots = [" "] * (int(max(e[4] for e in events) * 1000 / width_ms) + 1)
        for op, _mb, chunk, start, end in events:
            ch = "~" if op == "comm" else SYMBOL[op]
            ch = ch.lower() if chunk == 1 and op != "comm" else ch
            for k in range(int(start * 1000 / width_ms), int(end * 1000 / width_ms)):
                slots[k] = ch
        lines.append(f"  rank {rank} |{''.join(slots)}|")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--chunks", type=int, default=2, help="model chunks per rank for the interleaved schedule")
    ap.add_argument("--forward-ms", type=float, default=50.0, help="forward time of one stage; backward is 2x")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeline", type=int, nargs=2, default=[4, 8], metavar=("P", "M"),
                    help="print the per-instruction timeline of every schedule at this p and m")
    args = ap.parse_args()
    rows, lines = [], []
    with open(LOCK_PATH, "w") as lock:   # never time while distributed tests share the cores
        fcntl.flock(lock, fcntl.LOCK_EX)
        for pp in args.pp:
            cases = [(name, m, args.chunks if v is None else v, schedule)
                     for name, (schedule, v) in SCHEDULES.items() for m in args.microbatches
                     if name != "interleaved" or m % pp == 0]
            res = run(pp, cases, args.forward_ms / 1000, args.repeats)
            for name, m, v, _ in cases:
                ranks = res[(name, m)]
                wall = max(r[0] for r in ranks.values())
                bubble = statistics.mean(1 - r[1] / wall for r in ranks.values())
                held = "/".join(f"{r[2] / (2 * A_BYTES):.1f}" for _, r in sorted(ranks.items()))
                rows.append((name, pp, m, f"{wall * 1000:.0f}", f"{bubble:.3f}", f"{theory(name, pp, m, v):.3f}",
                             f"{bubble - theory(name, pp, m, v):+.3f}", held))
                if [pp, m] == args.timeline:
                    lines += [f"{name} (p={pp}, m={m}, one character = {args.forward_ms / 4:.1f} ms):"]
                    lines += timeline(ranks, args.forward_ms / 1000, args.forward_ms / 4)
    print_table(("schedule", "p", "m", "step ms", "bubble", "theory", "diff", "held / stage mb, per rank"), rows,
                title=f"# t_f = {args.forward_ms:.0f} ms per stage, B = W = t_f, interleaved v = {args.chunks}, "
                      f"median of {args.repeats} steps, gloo on CPU")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
