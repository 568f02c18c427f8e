"""Pipeline schedules as pure functions: one instruction list per stage, no processes and no tensors.

The instruction language (compute, send/receive, batches) and the lock-step communication placement live in
instructions.py; the zero-bubble generators (ZB-H1, ZB-V) in zero_bubble.py. This module holds no pipelining,
Megatron's 1F1B and interleaved 1F1B, and `build_schedule`, the one place that picks a schedule by name.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

from megagpt.config import layout_problems, v_shaped
from megagpt.pipeline.instructions import (COMM_OPS, COMPUTE_OPS, Compute, Instr, Step,  # noqa: F401 (re-exported)
                                           check_stage, group_steps, place_communication)
from megagpt.pipeline.zero_bubble import schedule_zb_h1, schedule_zb_v

SCHEDULES = ("1f1b", "interleaved", "zb-h1", "zb-v")


def _check_interleaving(num_microbatches: int, pp_size: int, num_chunks: int) -> None:
    problems = layout_problems(1, pp_size, virtual_chunks=num_chunks, num_microbatches=num_microbatches)
    if problems:
        raise ValueError("; ".join(problems))


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


def schedule_no_pipelining(num_microbatches: int, forward_only: bool = False) -> list[Instr]:
    """Forward then backward of each micro-batch in turn (gradient accumulation); one micro-batch alive."""
    check_stage(num_microbatches, 1, 0)
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
    check_stage(num_microbatches, pp_size, pp_rank)
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
    return tuple(map(tuple, place_communication(steps, p, v)))


def schedule_interleaved(num_microbatches: int, pp_size: int, pp_rank: int, num_chunks: int,
                         forward_only: bool = False) -> list[Instr]:
    """Megatron's interleaved 1F1B: rank r holds v model chunks (virtual stages c*p + r); bubble / v."""
    check_stage(num_microbatches, pp_size, pp_rank)
    if num_chunks < 1:
        raise ValueError(f"number of model chunks must be >= 1, got {num_chunks}")
    _check_interleaving(num_microbatches, pp_size, num_chunks)
    return list(_all_interleaved(num_microbatches, pp_size, num_chunks, forward_only)[pp_rank])


def build_schedule(num_microbatches: int, pp_size: int, pp_rank: int, num_chunks: int = 1,
                   forward_only: bool = False, schedule: Optional[str] = None) -> list[Instr]:
    """The schedule the executor runs: no pipelining when pp_size == 1, else the named one (None: 1F1B for one
    chunk, interleaved for several). zb-h1 falls back to no pipelining at pp_size == 1 (nothing to fill)."""
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {SCHEDULES}")
    if v_shaped(schedule):
        return schedule_zb_v(num_microbatches, pp_size, pp_rank, num_chunks, forward_only)
    if pp_size == 1:
        if num_chunks != 1:
            raise ValueError(f"{num_chunks} model chunks need pipeline-model-parallel-size > 1")
        return schedule_no_pipelining(num_microbatches, forward_only)
    if schedule == "zb-h1" and not forward_only:   # forward only, it is 1F1B's forward pass
        if num_chunks != 1:
            raise ValueError(f"zb-h1 runs one model chunk per rank, got {num_chunks}")
        return schedule_zb_h1(num_microbatches, pp_size, pp_rank, forward_only)
    if schedule == "interleaved" and num_chunks == 1:
        raise ValueError("the interleaved schedule needs several model chunks per rank, got 1")
    if num_chunks == 1:
        return schedule_1f1b(num_microbatches, pp_size, pp_rank, forward_only)
    return schedule_interleaved(num_microbatches, pp_size, pp_rank, num_chunks, forward_only)
