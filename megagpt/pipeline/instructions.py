"""The instruction language of pipeline schedules, where messages go, and the lock-step communication placement.

A schedule says, for one pipeline stage, in which order to run the compute of (micro-batch, model chunk) pairs and
where to exchange activations and gradients with the neighbouring stages. Keeping it pure lets
tests/test_schedules.py check every stage together (order, matching sends and receives, no deadlock, activations
in flight) without a process; `megagpt.pipeline.executor` runs the list on real tensors.

Instruction semantics (the contract between schedules, executor and the simulator in the tests):

* Compute ``(mb, chunk)`` on model chunk ``chunk`` of this rank, i.e. virtual stage
  ``parallel.state.virtual_stage(pp_size, pp_rank, chunk, num_chunks, v_shape)``: ``forward``; ``backward`` (the
  whole backward); or, split for zero-bubble schedules, ``backward_input`` (B: gradients w.r.t. the chunk's input,
  what the previous stage waits for) then ``backward_weight`` (W: the deferred weight gradients, which nobody waits
  for, so a schedule can run them in what would otherwise be bubbles).
* ``send_forward``: the activation of (mb, chunk) goes to the rank of the next virtual stage; ``recv_forward``: the
  input of (mb, chunk) arrives from the previous virtual stage. ``send_backward`` / ``recv_backward`` are the same
  for gradients, in reverse. The chunk of a communication instruction is always this rank's chunk (the one computed
  here). Interleaved placement: the next virtual stage is on rank ``pp_rank + 1`` (the last rank wraps around to
  rank 0, chunk + 1). V placement (zb-v): chunk 1 flows back up (next stage on ``pp_rank - 1``), and at the turn the
  last rank hands chunk 0's output to its own chunk 1 with no message at all.
* A maximal run of consecutive communication instructions is ONE batch: the executor posts all of them
  together through ``comm.batch_send_recv`` and waits for all. This is how send/recv pairs are fused
  (Megatron's send_forward_recv_backward, send_backward_recv_forward, ...): posted one at a time, two neighbours
  that each wait in a send to the other would deadlock.
* Messages between two ranks pair up first-in-first-out per direction, in list order (also inside a batch).
  With pp_size == 2, activations and gradients can share a direction, so this order matters; the tests prove that
  every send meets the receive of the same (kind, micro-batch, virtual stage).

Where the exchanges go: 1F1B receives just before and sends just after each compute (schedules._around_compute),
Megatron's placement, which waits for nothing but data. That placement deadlocks once ranks hold several chunks,
so the interleaved and zero-bubble schedules derive their batches from a logical clock (`place_communication`),
as Megatron's interleaved schedule does in lock-step: every message is sent and received at the same tick.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from megagpt.config import stage_of, virtual_stage

BACKWARD_OPS = ("backward", "backward_input", "backward_weight")
COMPUTE_OPS = ("forward",) + BACKWARD_OPS
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

    @property
    def is_backward(self) -> bool:
        """Any part of a backward (whole, B or W): where a chunk's parameters get gradients."""
        return self.op in BACKWARD_OPS


Step = Union[Instr, tuple]  # a compute Instr, or a tuple of communication Instrs posted as one batch
Compute = tuple             # (compute op, microbatch, chunk)


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


def check_stage(num_microbatches: int, pp_size: int, pp_rank: int) -> None:
    """Raise naming the numbers when there is nothing to schedule or the rank is outside the pipeline."""
    if num_microbatches < 1:
        raise ValueError(f"number of micro-batches must be >= 1, got {num_microbatches}")
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} is outside pipeline-model-parallel-size {pp_size}")


def neighbour_stage(forward: bool, chunk: int, pp_rank: int, pp_size: int, num_chunks: int,
                    v_shape: bool = False) -> Optional[tuple[int, int]]:
    """(pp_rank, chunk) of the next virtual stage (`forward`) or the previous one; None past either end."""
    vs = virtual_stage(pp_size, pp_rank, chunk, num_chunks, v_shape) + (1 if forward else -1)
    return stage_of(vs, pp_size, num_chunks, v_shape) if 0 <= vs < pp_size * num_chunks else None


def comm_peer(ins: Instr, pp_rank: int, pp_size: int, num_chunks: int, v_shape: bool = False) -> int:
    """Pipeline rank on the other end of a communication instruction."""
    forward = ins.op in ("send_forward", "recv_backward")    # towards the next virtual stage
    other = neighbour_stage(forward, ins.chunk, pp_rank, pp_size, num_chunks, v_shape)
    if other is None or other[0] == pp_rank:
        raise ValueError(f"{ins} on pipeline rank {pp_rank} has no peer: no message crosses there")
    return other[0]


def _message(op: str, chunk: int, rank: int, pp_size: int, num_chunks: int, v_shape: bool):
    """(destination (rank, chunk), recv op) of what a compute on `rank` hands on, or None (W, or an end stage)."""
    if op == "backward_weight":
        return None
    forward = op == "forward"
    dst = neighbour_stage(forward, chunk, rank, pp_size, num_chunks, v_shape)
    return None if dst is None else (dst, "recv_forward" if forward else "recv_backward")


def _needs(op: str, chunk: int, rank: int, pp_size: int, num_chunks: int, v_shape: bool) -> Optional[str]:
    """Which input a compute waits for: "recv_forward" (an activation), "recv_backward" (a gradient) or None."""
    if op == "forward":
        return "recv_forward" if neighbour_stage(False, chunk, rank, pp_size, num_chunks, v_shape) else None
    if op in ("backward", "backward_input"):
        return "recv_backward" if neighbour_stage(True, chunk, rank, pp_size, num_chunks, v_shape) else None
    return None


def place_communication(steps: list[list[list[Compute]]], pp_size: int, num_chunks: int,
                        v_shape: bool = False) -> list[list[Instr]]:
    """Turn per-rank compute steps into instruction lists whose batches cannot deadlock.

    A synchronous logical clock runs every rank together: at tick t a rank runs its next step (a group of
    computes) once every input it needs was produced at a tick < t. Each rank then closes tick t with one batch
    holding the sends of what it computed at t and the receives of everything its neighbours sent to it at t.
    Every message is therefore sent and received at the same tick, so a rank blocked in a batch only waits
    for partners that are blocked at strictly earlier ticks: no cycle, hence no deadlock even when a send
    completes only once its receive is posted. Received tensors wait in the executor until their compute.
    A hand-over between two chunks of one rank (the turn of the V) is no message, only a dependency.
    """
    p, v = pp_size, num_chunks
    produced_at: dict[tuple, int] = {}               # (recv op, mb, destination (rank, chunk)) -> tick
    outbox: dict[tuple[int, int], list[tuple]] = {}  # (sender rank, tick) -> [(dst rank, recv Instr)]
    timeline: list[list[tuple[int, list[Compute]]]] = [[] for _ in range(p)]
    nxt = [0] * p
    tick = 0
    while any(nxt[r] < len(steps[r]) for r in range(p)):
        ready = []
        for r in range(p):
            if nxt[r] == len(steps[r]):
                continue
            needs = [(need, mb, (r, chunk)) for op, mb, chunk in steps[r][nxt[r]]
                     if (need := _needs(op, chunk, r, p, v, v_shape))]
            if all(produced_at.get(n, tick) < tick for n in needs):
                ready.append(r)
        if not ready and tick > 2 * sum(len(s) for s in steps) + 2:
            raise RuntimeError(f"pipeline compute order cannot make progress: {steps}")
        for r in ready:
            step = steps[r][nxt[r]]
            nxt[r] += 1
            timeline[r].append((tick, step))
            for op, mb, chunk in step:
                msg = _message(op, chunk, r, p, v, v_shape)
                if msg is not None:
                    (dst, dst_chunk), recv_op = msg
                    produced_at[(recv_op, mb, (dst, dst_chunk))] = tick
                    if dst != r:
                        outbox.setdefault((r, tick), []).append((dst, Instr(recv_op, mb, dst_chunk)))
        tick += 1
    lists: list[list[Instr]] = []
    for r in range(p):
        steps_at = dict(timeline[r])
        out: list[Instr] = []
        for t in range(tick):
            for op, mb, chunk in steps_at.get(t, []):
                out.append(Instr(op, mb, chunk))
            for op, mb, chunk in steps_at.get(t, []):   # sends, in compute order (FIFO per direction)
                msg = _message(op, chunk, r, p, v, v_shape)
                if msg is not None and msg[0][0] != r:
                    out.append(Instr("send_forward" if op == "forward" else "send_backward", mb, chunk))
            for src in sorted({(r - 1) % p, (r + 1) % p} - {r}):  # receives, in each sender's send order
                out.extend(ins for dst, ins in outbox.get((src, t), []) if dst == r)
        lists.append(out)
    return lists
