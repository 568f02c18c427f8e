"""The collective ledger: what this rank last asked of every process group, for hang forensics.

When a job hangs, every rank sits in some collective or p2p receive waiting for a rank that is elsewhere; the
backend's own timeout says neither who nor where. parallel/comm.py records every call here before it enters the
backend (and marks it done after a blocking call returns), so at a hang each rank can tell: its n-th collective of
group G was `all_reduce [16, 2, 64] float32` at iteration 7 during `forward` of micro-batch 3, and it is still
inside it. Comparing the ranks' counts per group (forensics.summarize) names the rank that never arrived.

Sequence numbers count per group (keyed by its global ranks) and, for p2p, per direction (src>dst): the n-th
message a rank sends to a peer pairs with the n-th message the peer receives from it. Entries live in a ring
buffer (deque with maxlen), so the cost is a few microseconds per call and constant memory: bench/ledger_overhead.py
measures it against a training step. One ledger per process (a rank is a process), like comm's byte counters.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megagpt.diagnostics.faults import FaultPlan, plan_from_env

CAPACITY = 512     # entries kept; a training step of a small model makes ~100 calls per rank


class Entry:
    """One collective or p2p operation as this rank entered it."""

    __slots__ = ("seq", "key", "op", "shape", "dtype", "iteration", "index", "instruction", "microbatch",
                 "started", "done", "is_async")

    def __init__(self, seq: int, key: str, op: str, tensor: torch.Tensor, ledger: "Ledger", is_async: bool) -> None:
        self.seq, self.key, self.op, self.is_async = seq, key, op, is_async
        self.shape, self.dtype = tuple(tensor.shape), tensor.dtype
        self.iteration, self.index = ledger.iteration, ledger.index
        self.instruction, self.microbatch = ledger.instruction, ledger.microbatch
        self.started, self.done = time.time(), False

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "key": self.key, "op": self.op, "shape": list(self.shape),
                "dtype": str(self.dtype).replace("torch.", ""), "iteration": self.iteration, "index": self.index,
                "instruction": self.instruction, "microbatch": self.microbatch, "started": round(self.started, 3),
                "done": self.done, "async": self.is_async}


def describe(entry: dict) -> str:
    """`all_reduce [16, 2, 64] float32 (iteration 7, forward mb 3)` from an entry dict."""
    where = f"iteration {entry['iteration']}"
    if entry.get("instruction"):
        where += f", {entry['instruction']} mb {entry['microbatch']}"
    return f"{entry['op']} {entry['shape']} {entry['dtype']} ({where})"


class Ledger:
    """Ring buffer of this rank's collective calls plus the context they were made in."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.entries: deque[Entry] = deque(maxlen=capacity)
        self.counts: dict[str, int] = {}
        self.iteration = 0
        self.index = 0                      # instructions run in this iteration (orders positions in the schedule)
        self.instruction: Optional[str] = None
        self.microbatch: Optional[int] = None
        self.last_progress = time.monotonic()
        self._keys: dict[int, tuple[Any, str]] = {}   # id(group) -> (group kept alive, key)
        self._rank: Optional[int] = None
        self.faults: Optional[FaultPlan] = None

    @property
    def rank(self) -> int:
        if self._rank is None:
            self._rank = dist.get_rank() if dist.is_initialized() else 0
            self.faults = plan_from_env(self._rank)
        return self._rank

    def set_iteration(self, iteration: int) -> None:
        """A new training iteration starts (guardrails call this); also counts as progress."""
        self.iteration, self.index, self.instruction, self.microbatch = iteration, 0, None, None
        self.last_progress = time.monotonic()
        if self.rank is not None and self.faults is not None:
            self.faults.at_iteration_start(iteration)

    def set_instruction(self, op: str, microbatch: int) -> None:
        """The pipeline executor is about to run this instruction (the context of the calls that follow)."""
        self.index += 1
        self.instruction, self.microbatch = op, microbatch

    def _group_key(self, group: Any) -> str:
        found = self._keys.get(id(group))
        if found is None:
            ranks = (dist.get_process_group_ranks(group) if group is not None
                     else range(dist.get_world_size()))
            found = (group, "g:" + ",".join(map(str, ranks)))
            self._keys[id(group)] = found
        return found[1]

    def _add(self, key: str, op: str, tensor: torch.Tensor, is_async: bool) -> Entry:
        seq = self.counts.get(key, 0)
        self.counts[key] = seq + 1
        entry = Entry(seq, key, op, tensor, self, is_async)
        self.entries.append(entry)
        self.last_progress = time.monotonic()
        return entry

    def begin(self, op: str, group: Any, tensor: torch.Tensor, is_async: bool = False) -> Optional[Entry]:
        """Record a collective about to be entered; None: an injected fault says to skip it."""
        if self.rank is not None and self.faults is not None \
                and self.faults.before_collective(op if not is_async else op + "_async", self.iteration):
            return None
        return self._add(self._group_key(group), op, tensor, is_async)

    def begin_p2p(self, kind: str, tensor: torch.Tensor, peer: int) -> Entry:
        """Record a send to or receive from global rank `peer` (sequence counted per direction)."""
        src, dst = (self.rank, peer) if kind == "send" else (peer, self.rank)
        return self._add(f"p2p:{src}>{dst}", kind, tensor, False)

    def end(self, entry: Optional[Entry]) -> None:
        if entry is not None:
            entry.done = True
            self.last_progress = time.monotonic()

    def with_faults(self, forward_step: Callable) -> Callable:
        """`forward_step` (executor's signature) whose loss, or stage output off the last stage, carries an injected
        NaN or spike at the fault's iteration (tests only; returned unchanged without MEGAGPT_INJECT_FAULT)."""
        if self.rank is None or self.faults is None:
            return forward_step

        def poisoned(chunk: int, microbatch: int, input_tensor: Optional[torch.Tensor]):
            out, loss = forward_step(chunk, microbatch, input_tensor)
            if loss is None:
                return self.faults.poison(out, self.iteration), None
            factor = self.faults.poison(torch.ones((), device=out.device), self.iteration)
            return out * factor, loss * factor
        return poisoned

    def head(self, tail: int = 128) -> dict[str, Any]:
        """What a rank tells the others at a hang: where it is, its count per group, and its latest entries."""
        pending = [e for e in self.entries if not e.done and not e.is_async]
        return {"rank": self.rank, "iteration": self.iteration, "instruction": self.instruction,
                "microbatch": self.microbatch, "index": self.index, "counts": dict(self.counts),
                "open": pending[-1].to_dict() if pending else None,
                "tail": [e.to_dict() for e in list(self.entries)[-tail:]]}

    def tail_text(self, n: int = 64) -> str:
        rows = [f"  #{e['seq']:<6} {e['key']:<16} {'done' if e['done'] else 'async' if e['async'] else 'OPEN':<5} "
                f"{describe(e)}" for e in (x.to_dict() for x in list(self.entries)[-n:])]
        return "\n".join(rows)


LEDGER = Ledger()
