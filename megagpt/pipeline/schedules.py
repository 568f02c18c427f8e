"""Pipeline schedules as pure functions: one instruction list per stage, no processes and no tensors.

A schedule says, for one pipeline stage, in which order to run forwards and backwards of (micro-batch, model
chunk) pairs and where to exchange activations and gradients with the neighbouring stages. Keeping it pure
lets tests/test_schedules.py check every stage together (order, matching sends and receives, no deadlock,
activations in flight) without a process; `megagpt.pipeline.executor` runs the list on real tensors.

Instruction semantics (the contract between schedule, executor and the simulator in the tests):

* ``forward`` / ``backward`` ``(mb, chunk)``: compute on model chunk ``chunk`` of this rank, i.e. virtual
  stage ``chunk * pp_size + pp_rank``.
* ``send_forward``: the activation of (mb, chunk) goes to the next virtual stage (rank ``pp_rank + 1``; the
  last rank wraps around to rank 0, chunk + 1). ``recv_forward``: the input of (mb, chunk) arrives from the
  previous virtual stage. ``send_backward`` / ``recv_backward`` are the same for gradients, in reverse.
  The chunk of a communication instruction is always this rank's chunk (the one computed here).
* A maximal run of consecutive communication instructions is ONE batch: the executor posts all of them
  together through ``comm.batch_send_recv`` and waits for all. This is how send/recv pairs are fused
  (Megatron's send_forward_recv_backward, send_backward_recv_forward, send_forward_recv_forward, ...):
  posted one at a time, two neighbours that each wait in a send to the other would deadlock.
* Messages between two ranks pair up first-in-first-out per direction, in list order (also inside a batch).
  With pp_size == 2 and interleaving, activations and gradients share a direction, so this order matters;
  the tests prove that every send meets the receive of the same (kind, micro-batch, virtual stage).

Where the exchanges go: 1F1B receives just before and sends just after each compute (`_around_compute`),
which is Megatron's placement and waits for nothing but data. That placement deadlocks once ranks hold
several chunks, so the interleaved schedule derives its batches from a logical clock (`_place_communication`),
as Megatron's interleaved schedule does in lock-step: every message is sent and received at the same tick.
Both are checked by simulating all stages with sends that block until received (tests/test_schedules.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Union

from megagpt.config import layout_problems

COMPUTE_OPS = ("forward", "backward")
COMM_OPS = ("recv_forward", "send_forward", "recv_backward", "send_backward")


@dataclass(frozen=True)
class Instr:
    """One step of a stage: compute or a send/receive of micro-batch `microbatch` on model chunk `chunk`."""

    op: str
    microbatch: int
    chunk: int = 0

    def __post_init__(self) -> None:
        if self.op not in COMPUTE_OPS + COMM_OPS:
            raise ValueError(f"unknown pipeline instruction {self.op!r}; expected one of {COMPUTE_OPS + COMM_OPS}")

    @property
    def is_comm(self) -> bool:
        return self.op in COMM_OPS


Step = Union[Instr, tuple]  # a compute Instr, or a tuple of communication Instrs posted as one batch


def group_steps(instrs: list[Instr]) -> list[Step]:
    """Split a schedule into compute instructions and batches (maximal runs of communication instructions)."""
    steps: list[Step] = []
    batch: list[Instr] = []
    for ins in instrs:
        if ins.is_comm:
            batch.append(ins)
            continue
        if batch:
            steps.append(tuple(batch))
            batch = []
        steps.append(ins)
    if batch:
        steps.append(tuple(batch))
    return steps


def _check_interleaving(num_microbatches: int, pp_size: int, num_chunks: int) -> None:
    problems = layout_problems(1, pp_size, virtual_chunks=num_chunks, num_microbatches=num_microbatches)
    if problems:
        raise ValueError("; ".join(problems))


Compute = tuple  # ("forward" | "backward", microbatch, chunk)


def _around_compute(order: list[Compute], pp_size: int, pp_rank: int) -> list[Instr]:
    """Receive just before the compute that needs it, send just after the compute that produced it.

    Adjacent sends and receives then form one batch, which gives exactly Megatron's 1F1B exchanges:
    ``send_forward(i), recv_backward(j)`` after a steady forward and ``send_backward(j), recv_forward(i + 1)``
    after a steady backward. For 1F1B (one chunk) this is deadlock-free and, the tests show, never waits
    longer than the data dependencies force, even with unequal stage times.
    """
    out: list[Instr] = []
    for op, mb, chunk in order:
        first, last = pp_rank == 0, pp_rank == pp_size - 1
        if op == "forward":
            out += [Instr("recv_forward", mb)] * (not first) + [Instr("forward", mb)]
            out += [Instr("send_forward", mb)] * (not last)
        else:
            out += [Instr("recv_backward", mb)] * (not last) + [Instr("backward", mb)]
            out += [Instr("send_backward", mb)] * (not first)
    return out


def _message(op: str, mb: int, chunk: int, rank: int, pp_size: int, num_chunks: int):
    """(destination rank, destination chunk, recv op) of what a compute on `rank` sends, or None."""
    vs = chunk * pp_size + rank
    if op == "forward" and vs < pp_size * num_chunks - 1:
        return (vs + 1) % pp_size, (vs + 1) // pp_size, "recv_forward"
    if op == "backward" and vs > 0:
        return (vs - 1) % pp_size, (vs - 1) // pp_size, "recv_backward"
    return None


def _place_communication(steps: list[list[list[Compute]]], pp_size: int, num_chunks: int) -> list[list[Instr]]:
    """Turn per-rank compute steps into instruction lists whose batches cannot deadlock (interleaving).

    A synchronous logical clock runs every rank together: at tick t a rank runs its next step (a group of
    computes) once every input it needs was sent at a tick < t. Each rank then closes tick t with one batch
    holding the sends of what it computed at t and the receives of everything its neighbours sent to it at t.
    Every message is therefore sent and received at the same tick, so a rank blocked in a batch only waits
    for partners that are blocked at strictly earlier ticks: no cycle, hence no deadlock even when a send
    completes only once its receive is posted. Received tensors wait in the executor until their compute.
    """
    p = pp_size
    sent_at: dict[tuple, int] = {}                 # (op of the receive, mb, destination vs) -> tick
    outbox: dict[tuple[int, int], list[tuple]] = {}  # (sender rank, tick) -> [(dst rank, recv Instr)]
    timeline: list[list[tuple[int, list[Compute]]]] = [[] for _ in range(p)]
    nxt = [0] * p
    tick = 0
    while any(nxt[r] < len(steps[r]) for r in range(p)):
        ready = []
        for r in range(p):
            if nxt[r] == len(steps[r]):
                continue
            needs = []
            for op, mb, chunk in steps[r][nxt[r]]:
                vs = chunk * p + r
                if op == "forward" and vs > 0:
                    needs.append(("recv_forward", mb, vs))
                if op == "backward" and vs < p * num_chunks - 1:
                    needs.append(("recv_backward", mb, vs))
            if all(sent_at.get(n, tick) < tick for n in needs):
                ready.append(r)
        if not ready and tick > 2 * sum(len(s) for s in steps) + 2:
            raise RuntimeError(f"pipeline compute order cannot make progress: {steps}")
        for r in ready:
            step = steps[r][nxt[r]]
            nxt[r] += 1
            timeline[r].append((tick, step))
            for op, mb, chunk in step:
                msg = _message(op, mb, chunk, r, p, num_chunks)
                if msg is not None:
                    dst, dst_chunk, recv_op = msg
                    sent_at[(recv_op, mb, dst_chunk * p + dst)] = tick
                    outbox.setdefault((r, tick), []).append((dst, Instr(recv_op, mb, dst_chunk)))
        tick += 1
    last_tick = tick
    lists: list[list[Instr]] = []
    for r in range(p):
        steps_at = dict(timeline[r])
        out: list[Instr] = []
        for t in range(last_tick):
            for op, mb, chunk in steps_at.get(t, []):
                out.append(Instr(op, mb, chunk))
            for op, mb, chunk in steps_at.get(t, []):   # sends, in compute order (FIFO per direction)
                if _message(op, mb, chunk, r, p, num_chunks) is not None:
                    out.append(Instr("send_forward" if op == "forward" else "send_backward", mb, chunk))
            for src in sorted({(r - 1) % p, (r + 1) % p} - {r}):  # receives, in each sender's send order
                out.extend(ins for dst, ins in outbox.get((src, t), []) if dst == r)
        lists.append(out)
    return lists


def _check(num_microbatches: int, pp_size: int, pp_rank: int) -> None:
    if num_microbatches < 1:
        raise ValueError(f"number of micro-batches must be >= 1, got {num_microbatches}")
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} is outside pipeline-model-parallel-size {pp_size}")


def schedule_no_pipelining(num_microbatches: int, forward_only: bool = False) -> list[Instr]:
    """Forward then backward of each micro-batch in turn (gradient accumulation); one micro-batch alive."""
    _check(num_microbatches, 1, 0)
    out = []
    for mb in range(num_microbatches):
        out.append(Instr("forward", mb))
        if not forward_only:
            out.append(Instr("backward", mb))
    return out


def schedule_1f1b(num_microbatches: int, pp_size: int, pp_rank: int, forward_only: bool = False) -> list[Instr]:
    """PipeDream-flush 1F1B: warm-up forwards, steady one-forward-one-backward, cool-down backwards.

    Stage r runs ``pp_size - r - 1`` warm-up forwards, so at most ``pp_size - r`` micro-batches hold
    activations at once, instead of all of them as in GPipe; the bubble stays (p-1)/(m+p-1).
    """
    _check(num_microbatches, pp_size, pp_rank)
    m = num_microbatches
    if forward_only:
        return _around_compute([("forward", mb, 0) for mb in range(m)], pp_size, pp_rank)
    warmup = min(pp_size - pp_rank - 1, m)
    order = [("forward", mb, 0) for mb in range(warmup)]
    for j in range(m - warmup):
        order += [("forward", warmup + j, 0), ("backward", j, 0)]
    order += [("backward", j, 0) for j in range(m - warmup, m)]
    return _around_compute(order, pp_size, pp_rank)


def interleaved_order(k: int, pp_size: int, num_chunks: int, forward: bool) -> tuple[int, int]:
    """(micro-batch, chunk) of this rank's k-th forward (or backward) in Megatron's interleaved order.

    Micro-batches go through the chunks in groups of pp_size: chunk 0 takes mb 0..p-1, then chunk 1 the same
    mbs, ..., then chunk 0 takes mb p..2p-1. Backwards visit the chunks in reverse.
    """
    group, pos = divmod(k, pp_size * num_chunks)
    chunk = pos // pp_size
    if not forward:
        chunk = num_chunks - 1 - chunk
    return group * pp_size + pos % pp_size, chunk


def interleaved_warmup(num_microbatches: int, pp_size: int, pp_rank: int, num_chunks: int) -> int:
    """Warm-up forwards of interleaved 1F1B on a rank (chunk-forwards before the first backward).

    Megatron's count: 2 (p - r - 1) + (v - 1) p, capped at the v m chunk-forwards; all of them when m == p.
    Peak activations in flight on rank r are this + 1 chunk-micro-batches, each 1/v of a stage.
    """
    total = num_microbatches * num_chunks
    if num_microbatches == pp_size:
        return total
    return min(2 * (pp_size - pp_rank - 1) + (num_chunks - 1) * pp_size, total)


def _steps_interleaved(m: int, p: int, r: int, v: int, forward_only: bool) -> list[list[Compute]]:
    total = m * v
    fwd = [("forward", *interleaved_order(k, p, v, True)) for k in range(total)]
    bwd = [("backward", *interleaved_order(k, p, v, False)) for k in range(total)]
    if forward_only:
        return [[c] for c in fwd]
    warmup = interleaved_warmup(m, p, r, v)
    # Megatron's lock-step: one forward per warm-up step, a forward and a backward per steady step.
    return ([[fwd[k]] for k in range(warmup)] + [[fwd[warmup + j], bwd[j]] for j in range(total - warmup)]
            + [[bwd[j]] for j in range(total - warmup, total)])


@lru_cache(maxsize=256)
def _all_interleaved(m: int, p: int, v: int, forward_only: bool) -> tuple[tuple[Instr, ...], ...]:
    steps = [_steps_interleaved(m, p, r, v, forward_only) for r in range(p)]
    return tuple(map(tuple, _place_communication(steps, p, v)))


def schedule_interleaved(num_microbatches: int, pp_size: int, pp_rank: int, num_chunks: int,
                         forward_only: bool = False) -> list[Instr]:
    """Megatron's interleaved 1F1B: rank r holds v model chunks (virtual stages c*p + r); bubble / v."""
    _check(num_microbatches, pp_size, pp_rank)
    if num_chunks < 1:
        raise ValueError(f"number of model chunks must be >= 1, got {num_chunks}")
    _check_interleaving(num_microbatches, pp_size, num_chunks)
    return list(_all_interleaved(num_microbatches, pp_size, num_chunks, forward_only)[pp_rank])


def build_schedule(num_microbatches: int, pp_size: int, pp_rank: int, num_chunks: int = 1,
                   forward_only: bool = False) -> list[Instr]:
    """The schedule the executor runs: no pipelining when pp_size == 1, else 1F1B or interleaved."""
    if pp_size == 1:
        if num_chunks != 1:
            raise ValueError(f"{num_chunks} model chunks need pipeline-model-parallel-size > 1")
        return schedule_no_pipelining(num_microbatches, forward_only)
    if num_chunks == 1:
        return schedule_1f1b(num_microbatches, pp_size, pp_rank, forward_only)
    return schedule_interleaved(num_microbatches, pp_size, pp_rank, num_chunks, forward_only)
