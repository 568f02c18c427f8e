"""Zero-bubble pipeline schedules (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): ZB-H1 and ZB-V.

Both split each backward into B (input gradients: the previous stage waits for them) and W (weight gradients:
nobody waits), see parallel/layers.py. A stage in 1F1B idles while the gradient of its next micro-batch travels
back; a zero-bubble schedule runs deferred W passes there instead. Times below are in units of one F = B = W
(the split of a transformer layer's backward into dgrad and wgrad GEMMs is about even).

ZB-H1, one chunk per rank: 1F1B's order of F and B (warm-up p - r - 1 forwards, then one forward one backward), with
stage r running W(j - r) after B(j), i.e. its weight passes delayed by r micro-batches and flushed at the end. The
last stages' delayed W fill the cool-down, the first stage's B arrive sooner (B alone travels back, not B + W),
so the bubble drops from 1F1B's (p - 1)(F + B + W) to (p - 1)(F + B - W): makespan 3m + p - 1 units, a third of
1F1B's bubble. Memory: at most p - r micro-batches between F and B (1F1B's count), plus at most r waiting only for
W (holding the linear inputs and output grads, about half of an F's activations), so no stage holds more than
1F1B's first stage: the same peak activation memory.

ZB-V, two chunks per rank in a V (parallel/state.virtual_stage): chunk 0 on virtual stage r, chunk 1 on 2p - 1 - r,
so rank 0 holds both the first and the last stage and the turn at rank p - 1 needs no message. The order comes from
a list-scheduling simulation with unit times: at each tick each rank runs the first available of
B (chunk 0, then chunk 1), F (chunk 1, then chunk 0; only while fewer than 2p chunk-micro-batches, i.e. p stage
micro-batches as 1F1B's first stage, wait for their W), W (oldest first). Up to p = 4 it reaches the lower bound
6m + p - 1 chunk units (the last rank cannot start before the first activation crosses p - 1 ranks), so the bubble
is (p - 1) / (6m + p - 1); for p = 5..8 it loses at most p - 4 units more (tests/test_schedules.py), against the
6(p - 1) units of 1F1B's bubble. (The paper's hand-built ZB-V would close that gap.)

Both derive their batches with the lock-step placement (instructions.place_communication), deadlock-free by
construction; tests/test_schedules.py simulates every stage under rendezvous semantics to check.
"""
from __future__ import annotations

from functools import lru_cache

from megagpt.config import virtual_stage
from megagpt.pipeline.instructions import Compute, Instr, check_stage, place_communication


def zb_h1_order(num_microbatches: int, pp_size: int, pp_rank: int) -> list[Compute]:
    """Stage `pp_rank`'s compute order under ZB-H1: 1F1B's F/B order with W(j - pp_rank) after each B(j)."""
    m, delay = num_microbatches, pp_rank
    warmup = min(pp_size - pp_rank - 1, m)
    order: list[Compute] = [("forward", k, 0) for k in range(warmup)]
    done_w = 0

    def weights_after(j: int) -> list[Compute]:
        nonlocal done_w
        out = [("backward_weight", k, 0) for k in range(done_w, max(j - delay + 1, done_w))]
        done_w = max(done_w, j - delay + 1)
        return out

    for j in range(m - warmup):
        order += [("forward", warmup + j, 0), ("backward_input", j, 0)] + weights_after(j)
    for j in range(m - warmup, m):
        order += [("backward_input", j, 0)] + weights_after(j)
    return order + [("backward_weight", k, 0) for k in range(done_w, m)]


@lru_cache(maxsize=256)
def _all_zb_h1(m: int, p: int) -> tuple[tuple[Instr, ...], ...]:
    steps = [[[c] for c in zb_h1_order(m, p, r)] for r in range(p)]
    return tuple(map(tuple, place_communication(steps, p, 1)))


def schedule_zb_h1(num_microbatches: int, pp_size: int, pp_rank: int, forward_only: bool = False) -> list[Instr]:
    """ZB-H1: 1F1B's memory, a third of its bubble (module docstring). Forward only it is 1F1B's forward pass."""
    check_stage(num_microbatches, pp_size, pp_rank)
    if forward_only:
        raise ValueError("zb-h1 has no forward-only schedule of its own: build_schedule runs 1F1B's")
    return list(_all_zb_h1(num_microbatches, pp_size)[pp_rank])


def zb_v_orders(num_microbatches: int, pp_size: int, forward_only: bool = False) -> list[list[Compute]]:
    """Every rank's compute order under ZB-V, from the unit-time list-scheduling simulation (module docstring)."""
    m, p = num_microbatches, pp_size
    last = 2 * p - 1
    done: dict[tuple[str, int, int], int] = {}        # (F | B, mb, virtual stage) -> tick it ran
    next_f = [[0, 0] for _ in range(p)]
    next_b = [[0, 0] for _ in range(p)]
    pending_w: list[list[tuple[int, int]]] = [[] for _ in range(p)]
    in_flight = [0] * p                                # chunk-micro-batches between F and W
    orders: list[list[Compute]] = [[] for _ in range(p)]
    remaining = m * 2 * p * (1 if forward_only else 3)
    tick = 0

    def ran_before(key: tuple[str, int, int]) -> bool:
        return done.get(key, tick) < tick

    while remaining:
        chosen = []
        for r in range(p):
            vs = [virtual_stage(p, r, c, 2, True) for c in (0, 1)]
            pick = None
            for c in (0, 1):       # B, chunk 0 first: it frees the rank's oldest activations and feeds rank r - 1
                mb = next_b[r][c]
                if pick is None and not forward_only and mb < next_f[r][c] and (
                        ran_before(("F", mb, vs[c])) if vs[c] == last else ran_before(("B", mb, vs[c] + 1))):
                    pick = ("backward_input", mb, c)
            for c in (1, 0):       # F, chunk 1 first: it moves micro-batches towards the loss
                mb = next_f[r][c]
                if pick is None and mb < m and (forward_only or in_flight[r] < 2 * p) and (
                        vs[c] == 0 or ran_before(("F", mb, vs[c] - 1))):
                    pick = ("forward", mb, c)
            if pick is None and pending_w[r]:
                pick = ("backward_weight",) + pending_w[r][0]
            if pick is not None:
                chosen.append((r, pick))
        if not chosen:
            raise RuntimeError(f"zb-v list scheduling stalled at tick {tick} (m={m}, p={p})")
        for r, (op, mb, c) in chosen:
            orders[r].append((op, mb, c))
            remaining -= 1
            vs = virtual_stage(p, r, c, 2, True)
            if op == "forward":
                done[("F", mb, vs)] = tick
                next_f[r][c] += 1
                in_flight[r] += 1
            elif op == "backward_input":
                done[("B", mb, vs)] = tick
                next_b[r][c] += 1
                pending_w[r].append((mb, c))
            else:
                pending_w[r].pop(0)
                in_flight[r] -= 1
        tick += 1
    return orders


@lru_cache(maxsize=256)
def _all_zb_v(m: int, p: int, forward_only: bool) -> tuple[tuple[Instr, ...], ...]:
    steps = [[[c] for c in order] for order in zb_v_orders(m, p, forward_only)]
    return tuple(map(tuple, place_communication(steps, p, 2, v_shape=True)))


def schedule_zb_v(num_microbatches: int, pp_size: int, pp_rank: int, num_chunks: int = 2,
                  forward_only: bool = False) -> list[Instr]:
    """ZB-V: two chunks per rank in a V, 1F1B's peak memory, bubble (p - 1) / (6m + p - 1) (module docstring)."""
    check_stage(num_microbatches, pp_size, pp_rank)
    if num_chunks != 2 or pp_size < 2:
        raise ValueError(f"zb-v runs 2 model chunks per rank on pipeline-model-parallel-size >= 2, got "
                         f"{num_chunks} chunks and {pp_size} ranks")
    return list(_all_zb_v(num_microbatches, pp_size, forward_only)[pp_rank])
