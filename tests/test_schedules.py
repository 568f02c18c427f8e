"""Pipeline schedules without processes: every stage simulated together (megagpt/pipeline/simulator.py, the
reference for the instruction semantics: rendezvous sends, FIFO channels, batches that wait for all their ops)."""
from __future__ import annotations

import itertools
import random

import pytest

from megagpt.pipeline.simulator import Deadlock, ScheduleError, simulate
from megagpt.pipeline.schedules import (Instr, build_schedule, group_steps, interleaved_warmup,
                                        schedule_1f1b, schedule_interleaved, schedule_no_pipelining)


def peak_in_flight(instrs: list[Instr], until: str = "backward") -> int:
    """Most (mb, chunk) alive at once: forwarded and not yet through `until` (backward, backward_input or _weight)."""
    live, peak = 0, 0
    for ins in instrs:
        live += {"forward": 1, until: -1}.get(ins.op, 0)
        peak = max(peak, live)
    return peak


def check_each_once(instrs: list[Instr], m: int, v: int, forward_only: bool = False) -> None:
    """Every (mb, chunk) forwards once and backwards once after its forward (whole, or B then W); each chunk's
    backwards (and W) in micro-batch order, so its last W is its last gradient; comms follow their compute."""
    every = sorted(itertools.product(range(m), range(v)))
    by_op = {op: [(i.microbatch, i.chunk) for i in instrs if i.op == op]
             for op in ("forward", "backward", "backward_input", "backward_weight")}
    assert sorted(by_op["forward"]) == every
    split = bool(by_op["backward_input"])
    for op in ("backward_input", "backward_weight") if split else ("backward",):
        assert sorted(by_op[op]) == ([] if forward_only else every), op
        for c in range(v):
            assert [mb for mb, chunk in by_op[op] if chunk == c] == sorted(mb for mb, chunk in by_op[op] if chunk == c)
    assert not (split and by_op["backward"]), "a schedule either splits every backward or none"
    seen: dict[str, set] = {"forward": set(), "backward_input": set()}
    for ins in instrs:
        key = (ins.microbatch, ins.chunk)
        if ins.op in seen:
            seen[ins.op].add(key)
        if ins.op in ("backward", "backward_input", "send_forward"):
            assert key in seen["forward"], f"{ins} before its forward"
        if ins.op == "backward_weight":
            assert key in seen["backward_input"], f"{ins} before its B"


CONFIGS_1F1B = [(m, p) for p in (1, 2, 3, 4, 8) for m in (1, 2, 3, 4, 5, 8, 16)]
CONFIGS_INTERLEAVED = [(k * p, p, v) for p in (2, 3, 4, 8) for v in (2, 3, 4) for k in (1, 2, 3, 4)]


@pytest.mark.parametrize("m,p", CONFIGS_1F1B)
def test_1f1b_schedule(m, p):
    scheds = [build_schedule(m, p, r) for r in range(p)]
    for r, s in enumerate(scheds):
        check_each_once(s, m, 1)
        assert peak_in_flight(s) == min(p - r, m) <= p - r
        # Warm-up: p - r - 1 forwards before the first backward.
        first_b = next(i for i, ins in enumerate(s) if ins.op == "backward")
        assert sum(ins.op == "forward" for ins in s[:first_b]) == min(p - r, m)
    sim = simulate(scheds, t_fwd=1.0, t_bwd=2.0)
    # Ideal pipeline: m (tf + tb) of work plus a (p - 1)(tf + tb) bubble.
    assert sim["makespan"] == pytest.approx((m + p - 1) * 3.0)


@pytest.mark.parametrize("m,p,v", CONFIGS_INTERLEAVED)
def test_interleaved_schedule(m, p, v):
    scheds = [schedule_interleaved(m, p, r, v) for r in range(p)]
    for r, s in enumerate(scheds):
        check_each_once(s, m, v)
        warm = interleaved_warmup(m, p, r, v)
        assert peak_in_flight(s) == min(warm + 1, m * v)
        if m > p:   # the 1F1B regime: chunk-activations of at most p + 2(p - r - 1)/v full-stage micro-batches
            assert peak_in_flight(s) <= v * p + 2 * (p - r - 1) + 1
        # Each chunk sees micro-batches in order, forward and backward.
        for op in ("forward", "backward"):
            for c in range(v):
                mbs = [i.microbatch for i in s if i.op == op and i.chunk == c]
                assert mbs == sorted(mbs)
    sim = simulate(scheds, t_fwd=1.0 / v, t_bwd=2.0 / v)
    # Chunks take 1/v of a stage's time, the bubble shrinks to (p - 1)(tf + tb) / v. (m == p runs all
    # forwards first, as Megatron does, and reaches the same.)
    assert sim["makespan"] == pytest.approx(m * 3.0 + (p - 1) * 3.0 / v)


CONFIGS_ZB = [(m, p) for p in range(2, 9) for m in range(p, 4 * p + 1)]


@pytest.mark.parametrize("m,p", CONFIGS_ZB)
def test_zb_h1_schedule(m, p):
    """A third of 1F1B's bubble at 1F1B's memory, deadlock-free under rendezvous (B and W each half a backward)."""
    scheds = [build_schedule(m, p, r, schedule="zb-h1") for r in range(p)]
    for r, s in enumerate(scheds):
        check_each_once(s, m, 1)
        assert peak_in_flight(s, until="backward_input") == min(p - r, m)   # between F and B: 1F1B's count
        assert peak_in_flight(s, until="backward_weight") <= p              # waiting only for W: at most r more
    sim = simulate(scheds, t_fwd=1.0, t_bwd=2.0)
    assert sim["makespan"] == pytest.approx(3 * m + p - 1)                   # 1F1B: 3m + 3(p - 1)


@pytest.mark.parametrize("m,p", CONFIGS_ZB)
def test_zb_v_schedule(m, p):
    """Two chunks per rank in a V: bubble (p - 1) / (6m + p - 1) in chunk units, at most p stage micro-batches
    (2p chunk-micro-batches) alive per rank: 1F1B's first stage."""
    scheds = [build_schedule(m, p, r, 2, schedule="zb-v") for r in range(p)]
    for s in scheds:
        check_each_once(s, m, 2)
        assert peak_in_flight(s, until="backward_weight") <= 2 * p
    sim = simulate(scheds, t_fwd=1.0, t_bwd=2.0, v_shape=True)
    # The lower bound (the last rank waits p - 1 units for its first input), reached up to p = 4; the greedy
    # order loses at most p - 4 units beyond (1F1B's bubble is 6(p - 1) units in these chunk units).
    assert 6 * m + p - 1 <= sim["makespan"] <= 6 * m + p - 1 + max(0, p - 4)
    # The last rank hands chunk 0's activation to its own chunk 1: no message crosses at the turn.
    assert not any(i.op == "send_forward" and i.chunk == 0 for i in scheds[-1])
    with pytest.raises(ScheduleError):     # the lists only make sense with the V placement
        simulate(scheds, v_shape=False)


@pytest.mark.parametrize("schedule", ["zb-h1", "zb-v"])
@pytest.mark.parametrize("forward_only", [False, True])
@pytest.mark.parametrize("m,p", [(1, 2), (3, 4), (5, 8), (7, 3)])
def test_zb_schedules_with_few_or_odd_microbatches(m, p, schedule, forward_only):
    v = 2 if schedule == "zb-v" else 1
    scheds = [build_schedule(m, p, r, v, forward_only=forward_only, schedule=schedule) for r in range(p)]
    for s in scheds:
        check_each_once(s, m, v, forward_only)
    simulate(scheds, v_shape=schedule == "zb-v")


def test_build_schedule_names():
    assert build_schedule(4, 2, 0) == build_schedule(4, 2, 0, schedule="1f1b")
    assert build_schedule(4, 2, 1, 2) == build_schedule(4, 2, 1, 2, schedule="interleaved")
    assert build_schedule(3, 1, 0, schedule="zb-h1") == build_schedule(3, 1, 0)   # PP 1: nothing to pipeline
    with pytest.raises(ValueError, match="unknown pipeline schedule 'gpipe'"):
        build_schedule(4, 2, 0, schedule="gpipe")
    with pytest.raises(ValueError, match="zb-v runs 2 model chunks"):
        build_schedule(4, 2, 0, 1, schedule="zb-v")
    with pytest.raises(ValueError, match="interleaved schedule needs several model chunks"):
        build_schedule(4, 2, 0, 1, schedule="interleaved")


@pytest.mark.parametrize("forward_only", [False, True])
@pytest.mark.parametrize("m,p,v", [(4, 1, 1), (8, 4, 1), (5, 3, 1), (8, 2, 2), (8, 4, 3), (2, 2, 4)])
def test_any_schedule_runs_without_deadlock(m, p, v, forward_only):
    scheds = [build_schedule(m, p, r, v, forward_only=forward_only) for r in range(p)]
    for s in scheds:
        check_each_once(s, m, v, forward_only)
        if forward_only:
            assert peak_in_flight(s) == m * v   # no backward: the executor keeps nothing (checked on gloo)
    simulate(scheds)


def _receive_just_in_time(instrs: list[Instr], rank: int, p: int, v: int) -> list[Instr]:
    """Same compute order, receives right before and sends right after each compute (the 1F1B placement)."""
    out = []
    for ins in (i for i in instrs if not i.is_comm):
        vs, mb, c = ins.chunk * p + rank, ins.microbatch, ins.chunk
        first, last = vs == 0, vs == p * v - 1
        if ins.op == "forward":
            out += [Instr("recv_forward", mb, c)] * (not first) + [ins] + [Instr("send_forward", mb, c)] * (not last)
        else:
            out += [Instr("recv_backward", mb, c)] * (not last) + [ins] + [Instr("send_backward", mb, c)] * (not first)
    return out


def test_simulator_catches_deadlock_and_mismatch():
    # Interleaving with receives placed just in time deadlocks: a rank waits in a send for a neighbour that
    # waits in its own send (why schedule_interleaved uses the lock-step placement).
    scheds = [_receive_just_in_time(schedule_interleaved(4, 2, r, 2), r, 2, 2) for r in range(2)]
    with pytest.raises(Deadlock):
        simulate(scheds)
    # Both stages send first, in batches of their own, and receive later.
    s0 = [Instr("forward", 0), Instr("send_forward", 0), Instr("forward", 1), Instr("recv_backward", 0)]
    s1 = [Instr("forward", 1), Instr("send_backward", 0), Instr("forward", 2), Instr("recv_forward", 0)]
    with pytest.raises(Deadlock):
        simulate([s0, s1])
    # Wrong micro-batch on the other end of a channel.
    s0 = [Instr("forward", 0), Instr("send_forward", 0), Instr("recv_backward", 0), Instr("backward", 0)]
    s1_wrong = [Instr("recv_forward", 1), Instr("forward", 1), Instr("backward", 1), Instr("send_backward", 1)]
    with pytest.raises(ScheduleError, match="meets"):
        simulate([s0, s1_wrong])


def dependency_bound(schedules: list[list[Instr]], t_fwd: list, t_bwd: list, v: int = 1) -> float:
    """Makespan of the same compute orders if messages were free and buffered: only data dependencies wait."""
    p = len(schedules)
    orders = [[i for i in s if not i.is_comm] for s in schedules]
    done: dict[tuple, float] = {}
    pos, clock = [0] * p, [0.0] * p
    while any(pos[r] < len(orders[r]) for r in range(p)):
        for r in range(p):
            while pos[r] < len(orders[r]):
                ins = orders[r][pos[r]]
                vs = ins.chunk * p + r
                fwd = ins.op == "forward"
                dep = (ins.microbatch, vs - 1, True) if fwd else (ins.microbatch, vs + 1, False)
                needs_dep = vs > 0 if fwd else vs < p * v - 1
                if needs_dep and dep not in done:
                    break
                clock[r] = max(clock[r], done[dep] if needs_dep else 0.0) + (t_fwd[r] if fwd else t_bwd[r])
                done[(ins.microbatch, vs, fwd)] = clock[r]
                pos[r] += 1
    return max(clock)


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_1f1b_waits_only_for_data_with_unequal_stages(p):
    """Under rendezvous, the fused 1F1B batches never delay a stage beyond its data dependencies."""
    rng = random.Random(p)
    for m in (1, 2, 3, 5, 8, 16):
        scheds = [schedule_1f1b(m, p, r) for r in range(p)]
        for _ in range(4):
            t_fwd = [rng.uniform(0.5, 2.0) for _ in range(p)]
            t_bwd = [2 * t * rng.uniform(0.8, 1.2) for t in t_fwd]
            got = simulate(scheds, t_fwd, t_bwd)["makespan"]
            assert got == pytest.approx(dependency_bound(scheds, t_fwd, t_bwd))


def test_interleaved_p2_shares_channels_in_fifo_order():
    # PP=2: rank 1 sends both activations (wrapping to chunk + 1 on rank 0) and gradients to rank 0.
    s1 = schedule_interleaved(4, 2, 1, 2)
    ops = {i.op for i in s1}
    assert {"send_forward", "send_backward", "recv_forward", "recv_backward"} <= ops
    simulate([schedule_interleaved(4, 2, r, 2) for r in range(2)])


def test_no_pipelining_and_exact_lists():
    assert schedule_no_pipelining(2) == [Instr("forward", 0), Instr("backward", 0),
                                         Instr("forward", 1), Instr("backward", 1)]
    assert schedule_no_pipelining(2, forward_only=True) == [Instr("forward", 0), Instr("forward", 1)]
    # Stage 0 of 2, three micro-batches: one warm-up forward, fused send_forward+recv_backward batches.
    F, B, SF, RB = "forward", "backward", "send_forward", "recv_backward"
    assert schedule_1f1b(3, 2, 0) == [Instr(F, 0), Instr(SF, 0), Instr(F, 1), Instr(SF, 1), Instr(RB, 0),
                                      Instr(B, 0), Instr(F, 2), Instr(SF, 2), Instr(RB, 1), Instr(B, 1),
                                      Instr(RB, 2), Instr(B, 2)]
    steps = group_steps(schedule_1f1b(3, 2, 1))
    assert steps[:4] == [(Instr("recv_forward", 0),), Instr(F, 0), Instr(B, 0),
                         (Instr("send_backward", 0), Instr("recv_forward", 1))]


def test_bad_schedules_raise_naming_numbers():
    with pytest.raises(ValueError, match=r"micro-batches per step \(6\) .* 4"):
        schedule_interleaved(6, 4, 0, 2)
    with pytest.raises(ValueError, match="pipeline rank 4"):
        schedule_1f1b(4, 4, 4)
    with pytest.raises(ValueError, match="micro-batches must be >= 1"):
        schedule_1f1b(0, 2, 0)
    with pytest.raises(ValueError, match="2 model chunks"):
        build_schedule(4, 1, 0, num_chunks=2)
    with pytest.raises(ValueError, match=r"interleaving \(3 model chunks per rank\) needs"):
        schedule_interleaved(4, 1, 0, 3)
    with pytest.raises(ValueError, match="unknown pipeline instruction"):
        Instr("fwd", 0)
