"""Fault injection for tests (not for users): `MEGAGPT_INJECT_FAULT="kind:rank=R:iteration=N[,kind:...]"`.

Every guardrail of forensics.py and guardrails.py claims to catch a failure; these entries make the failure happen
on purpose at a chosen rank and iteration, so the tests can prove the claim on real processes:

* `hang`            rank R blocks forever before its first collective of iteration N (a rank stuck in a kernel);
* `skip-collective` rank R skips its first all-reduce of iteration N (a rank that took another code path);
* `kill`            rank R dies (`os._exit`) when iteration N starts (a node lost);
* `nan` / `spike`   rank R's loss (or, off the last stage, its stage output) is multiplied by NaN / by 100.

Nothing here costs anything when the variable is unset: `PLAN` stays None and callers test that first.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

ENV = "MEGAGPT_INJECT_FAULT"
KINDS = ("hang", "nan", "spike", "skip-collective", "kill")
KILLED_EXIT_CODE = 137    # what a shell reports for SIGKILL


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    iteration: int


def parse_faults(text: str) -> list[Fault]:
    """Parse the variable's entries (comma or semicolon separated); a malformed entry is an error, not ignored,
    so a test can never pass because its fault silently did not happen."""
    faults = []
    for entry in filter(None, (e.strip() for e in text.replace(";", ",").split(","))):
        kind, *fields = entry.split(":")
        values = dict(f.split("=", 1) for f in fields if "=" in f)
        if kind not in KINDS or set(values) != {"rank", "iteration"} or len(fields) != 2:
            raise ValueError(f"{ENV}: bad entry {entry!r}; expected KIND:rank=R:iteration=N with KIND in {KINDS}")
        faults.append(Fault(kind, int(values["rank"]), int(values["iteration"])))
    return faults


class FaultPlan:
    """This rank's pending faults; each fires once (a NaN or spike: in every micro-batch of its iteration)."""

    def __init__(self, faults: list[Fault], rank: int) -> None:
        self.pending = [f for f in faults if f.rank == rank]
        self.fired: set[Fault] = set()
        self.rank = rank

    def _take(self, kind: str, iteration: int) -> Optional[Fault]:
        for fault in self.pending:
            if fault.kind == kind and fault.iteration == iteration:
                self.pending.remove(fault)
                _say(f"injected fault: {kind} on rank {self.rank} at iteration {iteration} (time {time.time():.3f})")
                return fault
        return None

    def at_iteration_start(self, iteration: int) -> None:
        if self._take("kill", iteration):
            os._exit(KILLED_EXIT_CODE)

    def before_collective(self, op: str, iteration: int) -> bool:
        """Called by the ledger before every collective; True: skip this one. A hang never returns."""
        if self._take("hang", iteration):
            while True:
                time.sleep(3600)
        return op == "all_reduce" and self._take("skip-collective", iteration) is not None

    def poison(self, tensor: torch.Tensor, iteration: int) -> torch.Tensor:
        """The loss (or stage output) with a NaN or x100 spike injected at this iteration, else unchanged. Every
        micro-batch of the iteration is hit, so the step's loss is exactly NaN or 100 x the clean one."""
        for fault in self.pending:
            if fault.kind in ("nan", "spike") and fault.iteration == iteration:
                if fault not in self.fired:
                    self.fired.add(fault)
                    _say(f"injected fault: {fault.kind} on rank {self.rank} at iteration {iteration} "
                         f"(time {time.time():.3f})")
                return tensor * (float("nan") if fault.kind == "nan" else 100.0)
        return tensor


def _say(line: str) -> None:
    print(f" [{ENV}] {line}", file=sys.stderr, flush=True)


def plan_from_env(rank: int) -> Optional[FaultPlan]:
    text = os.environ.get(ENV, "")
    return FaultPlan(parse_faults(text), rank) if text.strip() else None
