"""Every stage's instruction list run together, without processes: the reference for the instruction semantics.

The transport is the strictest one: a send completes only when the receiver has posted the matching receive
(rendezvous, as NCCL and large gloo messages behave), each batch (run of adjacent communication instructions) waits
for all of its operations, and messages pair first-in-first-out per (sender, receiver) direction. A set of lists
passes only if this machine runs to the end and every pairing joins the same (kind, micro-batch, virtual stage).
Peers follow the placement rule only (virtual stage vs -> vs + 1 for activations), not the executor's peer code,
so the two are checked against each other.

tests/test_schedules.py proves the schedules with it (order, timing, makespan); the trainer's pre-flight
(diagnostics/preflight.py, --check-schedule) runs it on the lists of the run before the first step, where a
mismatch would otherwise be a hang in the middle of a step.
"""
from __future__ import annotations

from collections import Counter
from typing import Union

from megagpt.config import virtual_stage
from megagpt.pipeline.instructions import Instr, group_steps

DURATION = {"forward": "f", "backward": "b", "backward_input": "bi", "backward_weight": "bw"}


class ScheduleError(ValueError):
    """Pipeline instruction lists whose sends and receives do not match."""


class Deadlock(ScheduleError):
    """Every stage that has not finished waits in a batch that can never complete."""


def _say(ins: Instr, rank: int) -> str:
    return f"stage {rank}'s {ins.op} of micro-batch {ins.microbatch} (chunk {ins.chunk})"


def _message(ins: Instr, rank: int, p: int, v: int = 1, v_shape: bool = False) -> tuple[int, int, str, tuple]:
    """(src, dst, send|recv, identity) of a communication instruction on `rank`; identity names the sender."""
    vs = virtual_stage(p, rank, ins.chunk, v, v_shape)
    stages = {virtual_stage(p, r, c, v, v_shape): r for r in range(p) for c in range(v)}

    def where(stage: int) -> int:
        if stage not in stages:
            raise ScheduleError(f"{_say(ins, rank)} has no peer: there is no virtual stage {stage}")
        return stages[stage]

    if ins.op == "send_forward":
        return rank, where(vs + 1), "send", ("act", ins.microbatch, vs)
    if ins.op == "recv_forward":
        return where(vs - 1), rank, "recv", ("act", ins.microbatch, vs - 1)
    if ins.op == "send_backward":
        return rank, where(vs - 1), "send", ("grad", ins.microbatch, vs)
    return where(vs + 1), rank, "recv", ("grad", ins.microbatch, vs + 1)


def _key_steps(steps: list, p: int, v: int, v_shape: bool) -> list[list]:
    """Number every op in its direction: the n-th send on (src, dst) meets the n-th receive on (src, dst)."""
    keyed: list[list] = []
    for r, st in enumerate(steps):
        seq: Counter = Counter()
        rows: list[Union[Instr, list]] = []
        for step in st:
            if isinstance(step, Instr):
                rows.append(step)
                continue
            ops = []
            for ins in step:
                src, dst, kind, ident = _message(ins, r, p, v, v_shape)
                ops.append(((src, dst, seq[(src, dst, kind)], kind), (ident, ins, r)))
                seq[(src, dst, kind)] += 1
            rows.append(ops)
        keyed.append(rows)
    return keyed


def simulate(schedules: list[list[Instr]], t_fwd=1.0, t_bwd=2.0, v_shape: bool = False) -> dict:
    """Run all stages under rendezvous semantics; return makespan, busy time and compute events per stage.

    t_fwd / t_bwd: compute time of one forward / whole backward, a number or a list with one per stage; a split
    backward's B and W each take half of t_bwd. v_shape: the chunks are placed in a V (zb-v). Raises Deadlock or
    ScheduleError naming the stage, instruction and micro-batch.
    """
    p = len(schedules)
    v = 1 + max((ins.chunk for s in schedules for ins in s), default=0)
    t_fwd = t_fwd if isinstance(t_fwd, list) else [t_fwd] * p
    t_bwd = t_bwd if isinstance(t_bwd, list) else [t_bwd] * p
    times = [{"f": t_fwd[r], "b": t_bwd[r], "bi": t_bwd[r] / 2, "bw": t_bwd[r] / 2} for r in range(p)]
    keyed = _key_steps([group_steps(s) for s in schedules], p, v, v_shape)
    pos, clock = [0] * p, [0.0] * p
    posted: dict[tuple, tuple] = {}          # op key -> ((identity, instr, rank), post time)
    matched: dict[tuple, float] = {}         # op key -> match time
    busy = [0.0] * p
    events: list[list[tuple]] = [[] for _ in range(p)]
    while any(pos[r] < len(keyed[r]) for r in range(p)):
        progress = False
        for r in range(p):
            while pos[r] < len(keyed[r]):
                step = keyed[r][pos[r]]
                if isinstance(step, Instr):
                    dur = times[r][DURATION[step.op]]
                    events[r].append((step.op, step.microbatch, step.chunk, clock[r], clock[r] + dur))
                    clock[r] += dur
                    busy[r] += dur
                    pos[r] += 1
                    progress = True
                    continue
                for key, ident in step:
                    if key not in posted and key not in matched:
                        posted[key] = (ident, clock[r])
                        progress = True
                for key, ident in step:
                    if key in matched:
                        continue
                    other = key[:3] + ("recv" if key[3] == "send" else "send",)
                    if other in posted:
                        (other_ident, other_ins, other_rank), other_t = posted.pop(other)
                        _, t = posted.pop(key)
                        if other_ident != ident[0]:
                            raise ScheduleError(f"message #{key[2]} from stage {key[0]} to stage {key[1]}: "
                                                f"{_say(ident[1], r)} meets {_say(other_ins, other_rank)}")
                        matched[key] = matched[other] = max(t, other_t)
                        progress = True
                if all(key in matched for key, _ in step):
                    clock[r] = max([clock[r]] + [matched[key] for key, _ in step])
                    pos[r] += 1
                    progress = True
                    continue
                break
        if not progress:
            stuck = "; ".join(f"stage {r} waits in " + ", ".join(_say(ident[1], r).split("'s ", 1)[1]
                                                                  for _, ident in keyed[r][pos[r]])
                              for r in range(p) if pos[r] < len(keyed[r]))
            raise Deadlock(f"pipeline schedule deadlocks: {stuck}")
    if posted:
        raise ScheduleError("unmatched: " + "; ".join(
            f"{_say(ins, r)} is never {'received' if key[3] == 'send' else 'sent'}"
            for key, ((_, ins, r), _) in posted.items()))
    return {"makespan": max(clock), "busy": busy, "events": events}
