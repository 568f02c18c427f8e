"""The watchdog: when a rank makes no progress for --watchdog-timeout-seconds, report, agree on a summary, exit.

Progress is any collective entered or finished, or an iteration started (the ledger's `last_progress`). A thread
checks it; on a stall (or, through `fire`, on a collective that raised because a peer died) the rank:

1. writes `<dir>/hang_report/rank_XXXXX.txt` (forensics.write_rank_report);
2. raises the alarm and posts its ledger head in the launcher's TCPStore (MASTER_ADDR:MASTER_PORT, a client
   of its own): the store is a side channel that does not depend on the stuck process group, and other ranks'
   watchdogs see the alarm at their next poll, so a rank busy elsewhere joins without waiting for its own timeout;
3. the first rank to claim the summary waits (at most `grace_s`) for every head, prints forensics.summarize's text
   and stores it in hang_report/summary.txt (the heads it read in heads.json);
4. every rank leaves with `os._exit(EXIT_CODE)`: the main thread is stuck inside the backend, where no exception
   can reach it, and no rank may be left running.
Without a store (none reachable) each rank still writes its report and exits.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Callable, NoReturn, Optional

import torch.distributed as dist

from megagpt.diagnostics.forensics import summarize, write_rank_report
from megagpt.diagnostics.ledger import LEDGER, Ledger

EXIT_CODE = 3
PREFIX = "megagpt/forensics/"


def connect_store(timeout_s: float = 30.0) -> Optional[dist.Store]:
    """A client of the launcher's TCPStore (None when MASTER_ADDR/PORT name none reachable)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    try:
        return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except (RuntimeError, ValueError) as exc:
        print(f" megagpt watchdog: no store at {addr}:{port} ({exc}); hang reports stay local", file=sys.stderr)
        return None


class Watchdog:
    """Per-rank stall detector and forensics coordinator (see the module docstring)."""

    def __init__(self, timeout_s: float, report_dir: str, rank: int, world_size: int,
                 store: Optional[dist.Store] = None, ledger: Ledger = LEDGER,
                 exit_fn: Callable[[int], None] = os._exit) -> None:
        self.timeout_s, self.report_dir, self.rank, self.world_size = timeout_s, report_dir, rank, world_size
        self.store, self.ledger, self.exit_fn = store, ledger, exit_fn
        self.grace_s = max(5.0, min(60.0, timeout_s))           # how long the summary waits for late heads
        self.poll_s = min(max(timeout_s / 10.0, 0.1), 5.0)
        self._stop = threading.Event()
        self._fired = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="megagpt-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self.ledger.last_progress = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self.ledger.last_progress
            if idle > self.timeout_s:
                self.fire(f"no progress for {idle:.1f} s (--watchdog-timeout-seconds {self.timeout_s:g})")
            alarm = self._get("alarm")
            if alarm is not None:
                self.fire(f"alarm raised by {alarm}")

    # ---- store helpers: any store error drops the side channel, never the report --------------------------
    def _get(self, key: str) -> Optional[str]:
        if self.store is None:
            return None
        try:
            return self.store.get(PREFIX + key).decode() if self.store.check([PREFIX + key]) else None
        except RuntimeError:
            self.store = None
            return None

    def _set(self, key: str, value: str) -> None:
        if self.store is not None:
            try:
                self.store.set(PREFIX + key, value)
            except RuntimeError:
                self.store = None

    def _add(self, key: str, amount: int = 1) -> int:
        try:
            return int(self.store.add(PREFIX + key, amount)) if self.store is not None else 0
        except RuntimeError:
            self.store = None
            return 0

    # ---- the forensics ---------------------------------------------------------------------------------------
    def fire(self, reason: str) -> NoReturn:
        """Report, exchange heads, summarize (one rank), exit non-zero. Runs once; later callers wait for the exit."""
        if not self._fired.acquire(blocking=False):
            while True:
                time.sleep(3600)
        try:
            path = write_rank_report(self.report_dir, self.rank, reason, self.ledger)
            print(f" megagpt watchdog: rank {self.rank}: {reason}; report in {path}", file=sys.stderr, flush=True)
            if self._get("alarm") is None:
                self._set("alarm", f"rank {self.rank}: {reason}")
            self._set(f"head/{self.rank}", json.dumps({**self.ledger.head(), "reason": reason}))
            self._add("posted")
            if self.store is None or self._add("claim") == 1:
                self._summarize()
            else:
                self._wait_for("done", self.grace_s + 10.0)
            self._add("left")
            if self.rank == 0:   # a plain launch hosts the store in rank 0: leave after everyone has read it
                end = time.monotonic() + 5.0
                while time.monotonic() < end and self._peek("left") < self._peek("posted"):
                    time.sleep(0.1)
        except Exception:   # noqa: BLE001 - whatever happens, the rank must still exit
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            self.exit_fn(EXIT_CODE)
        raise SystemExit(EXIT_CODE)   # only reached with a test's exit_fn

    def _wait_for(self, key: str, seconds: float) -> Optional[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.store is not None:
            value = self._get(key)
            if value is not None:
                return value
            time.sleep(0.1)
        return None

    def _summarize(self) -> None:
        heads: dict[int, Optional[dict]] = {}
        deadline = time.monotonic() + self.grace_s
        while self.store is not None:
            for r in range(self.world_size):
                if r not in heads:
                    text = self._get(f"head/{r}")
                    if text is not None:
                        heads[r] = json.loads(text)
            if len(heads) == self.world_size or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        text = summarize(heads if heads else {self.rank: {**self.ledger.head(), "reason": "local only"}},
                         self.world_size)
        print(text, flush=True)
        with open(os.path.join(self.report_dir, "hang_report", "summary.txt"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(self.report_dir, "hang_report", "heads.json"), "w") as f:
            json.dump(heads, f)       # every rank's ledger head, for forensics.summarize offline
        self._set("done", "1")

    def _peek(self, key: str) -> int:
        return self._add(key, 0)      # adding 0 reads a counter without waiting for it to exist
