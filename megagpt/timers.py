"""Megatron's timers: named wall-clock spans inside an iteration, reported every log interval over all ranks.

`--timing-log-level` picks which spans exist, with Megatron's assignment:
  0: none; the log line's iteration time only, and timing adds no synchronization at all;
  1: spans that run about once per iteration (forward-backward, the gradient reductions, params-all-gather,
     optimizer): cheap enough to leave on;
  2: spans that run per micro-batch (batch-generator, forward-compute, backward-compute, every pipeline send/recv):
     each one synchronizes the device, so level 2 slows a GPU run down.
A span above the chosen level is one shared no-op object, so call sites need no `if`.

Why a timer synchronizes: CUDA kernels run asynchronously, so a host clock read without `torch.cuda.synchronize()`
measures kernel launches, not work. Timers synchronize only when the run's device is CUDA (never on CPU). Level-1
spans also start after a barrier over all ranks (Megatron's --barrier-with-L1-time, on unless
--no-barrier-with-level-1-timing), so a rank waiting for a slow peer inside the span is not billed for the peer's
work; the barrier is a one-element all-reduce through parallel/comm.py, so every rank must reach every level-1 span.

Times are summed over the log interval and divided by the iterations it had (Megatron divides by --log-interval
even when the last interval is shorter). The Trainer owns the one Timers object of a run and passes it to the
engine, optimizer and pipeline executor: there is no module-level timer registry, so one process can hold several.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable, Optional, Union

import torch

from megagpt.parallel import comm

_DIRECTIONS = ("forward", "backward")


def p2p_timer_name(sends: set[str], recvs: set[str]) -> str:
    """Megatron's name for one pipeline exchange: the directions sent, then received, e.g. sends {"forward"} and
    recvs {"backward"} -> "forward-send-backward-recv"; sends only -> "forward-send"."""
    parts = []
    for dirs, verb in ((sends, "send"), (recvs, "recv")):
        if dirs:
            parts.append("-".join(d for d in _DIRECTIONS if d in dirs) + "-" + verb)
    return "-".join(parts)


def _all_p2p_names() -> list[str]:
    """Megatron's nine exchange names in its order, then the other combinations our schedules can batch (zero-bubble
    and interleaved steps may send both ways at once): a fixed list, identical on every rank."""
    megatron = ["forward-recv", "forward-send", "backward-recv", "backward-send", "forward-send-forward-recv",
                "forward-send-backward-recv", "backward-send-forward-recv", "backward-send-backward-recv",
                "forward-backward-send-forward-backward-recv"]
    subsets = [set(c) for n in range(3) for c in itertools.combinations(_DIRECTIONS, n)]
    every = [p2p_timer_name(s, r) for s in subsets for r in subsets if s or r]
    return megatron + [name for name in every if name not in megatron]


# What each level reports, in Megatron's order (training_log's timers_to_log). forward-backward is the pipeline
# schedule alone: all-grads-sync runs after it here (Megatron nests it inside), so the level-1 spans do not overlap.
TIMERS_BY_LEVEL: dict[int, list[str]] = {
    1: ["forward-backward", "layernorm-grads-all-reduce", "embedding-grads-all-reduce", "grads-all-reduce",
        "grads-reduce-scatter", "all-grads-sync", "params-all-gather", "optimizer-copy-to-main-grad",
        "optimizer-unscale-and-check-inf", "optimizer-clip-main-grad", "optimizer-count-zeros", "optimizer-inner-step",
        "optimizer-copy-main-to-model-params", "optimizer"],
    2: ["batch-generator", "forward-compute", "backward-compute", *_all_p2p_names()],
}


def timers_to_log(level: int) -> list[str]:
    """Every timer name reported at `level` (the lower levels' included)."""
    return [name for lvl in sorted(TIMERS_BY_LEVEL) if lvl <= level for name in TIMERS_BY_LEVEL[lvl]]


class Timer:
    """One named span: start/stop (or `with`) add up the elapsed seconds until `elapsed(reset=True)`."""

    def __init__(self, name: str, sync: Optional[Callable[[], None]], barrier: Optional[Callable[[], None]]) -> None:
        self.name = name
        self._sync, self._barrier = sync, barrier
        self._elapsed = 0.0
        self._started_at: Optional[float] = None

    def start(self) -> None:
        if self._started_at is not None:
            raise RuntimeError(f"timer {self.name!r} started twice")
        if self._barrier is not None:
            self._barrier()
        if self._sync is not None:
            self._sync()
        self._started_at = time.perf_counter()

    def stop(self) -> None:
        if self._started_at is None:
            raise RuntimeError(f"timer {self.name!r} stopped without a start")
        if self._sync is not None:
            self._sync()
        self._elapsed += time.perf_counter() - self._started_at
        self._started_at = None

    def elapsed(self, reset: bool = True) -> float:
        """Seconds accumulated (a running span counts up to now and keeps running)."""
        running = self._started_at is not None
        if running:
            self.stop()
        value = self._elapsed
        if reset:
            self._elapsed = 0.0
        if running:
            self._started_at = time.perf_counter()
        return value

    def __enter__(self) -> "Timer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _NullTimer:
    """A span above the timing level: every call does nothing."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def __enter__(self) -> "_NullTimer":
        return self

    def __exit__(self, *exc) -> None:
        pass


_NULL_TIMER = _NullTimer()


class Timers:
    """The run's timers at one --timing-log-level; `timers(name, level)` is the span to time (a no-op above it)."""

    def __init__(self, log_level: int = 0, log_option: str = "minmax", device: Optional[torch.device] = None,
                 barrier_with_l1_time: bool = True) -> None:
        if log_option not in ("max", "minmax", "all"):
            raise ValueError(f"timing log option must be max, minmax or all, got {log_option!r}")
        self.log_level, self.log_option = log_level, log_option
        self.device = device if device is not None else torch.device("cpu")
        self._sync = torch.cuda.synchronize if self.device.type == "cuda" else None
        self._barrier_with_l1 = barrier_with_l1_time
        self._timers: dict[str, Timer] = {}

    def __call__(self, name: str, log_level: int) -> Union[Timer, _NullTimer]:
        if log_level > self.log_level:
            return _NULL_TIMER
        timer = self._timers.get(name)
        if timer is None:
            barrier = self._barrier if log_level == 1 and self._barrier_with_l1 else None
            timer = self._timers[name] = Timer(name, self._sync, barrier)
        return timer

    def _barrier(self) -> None:
        comm.all_reduce(torch.zeros(1, device=self.device), None)

    def gather(self, normalizer: float = 1.0) -> dict[str, list[float]]:
        """Collective over all ranks: per reported name, each rank's milliseconds divided by `normalizer` (0.0 where
        a rank never ran it); names no rank ran are left out. Resets every timer. Empty at level 0 (no collective)."""
        names = timers_to_log(self.log_level)
        if not names:
            return {}
        mine = torch.tensor([self._timers[n].elapsed() if n in self._timers else 0.0 for n in names],
                            dtype=torch.float64, device=self.device)
        world = comm.group_size(None)
        every = torch.zeros(world * len(names), dtype=torch.float64, device=self.device)
        if world == 1:
            every.copy_(mine)
        else:
            comm.all_gather_into(every, mine, None)
        table = (every.view(world, len(names)) * (1000.0 / normalizer)).t().tolist()   # [names][ranks] ms
        return {name: row for name, row in zip(names, table) if any(t > 0.0 for t in row)}

    def report(self, per_rank: dict[str, list[float]]) -> Optional[str]:
        """The gathered times in Megatron's text, by --timing-log-option (None when nothing was timed)."""
        return format_timers(per_rank, self.log_option)


def min_max(times: list[float]) -> tuple[float, float]:
    """Min and max over the ranks that ran the span (Megatron leaves out ranks with no time)."""
    ran = [t for t in times if t > 0.0]
    return min(ran), max(ran)


def format_timers(per_rank: dict[str, list[float]], option: str = "minmax") -> Optional[str]:
    """Megatron's timer block: `(min, max) time across ranks (ms):` then one dotted line per timer."""
    if not per_rank:
        return None
    if option == "all":
        lines = ["times across ranks (ms):"]
        for name, times in per_rank.items():
            lines.append(f"  {name}:")
            lines += [f"     rank {rank:2d}: {t:.2f}" for rank, t in enumerate(times) if t > 0.0]
        return "\n".join(lines)
    max_only = option == "max"
    lines = ["max time across ranks (ms):" if max_only else "(min, max) time across ranks (ms):"]
    for name, times in per_rank.items():
        lo, hi = min_max(times)
        value = f"{hi:.2f}" if max_only else f"({lo:.2f}, {hi:.2f})"
        lines.append(f"    {(name + ' ').ljust(48, '.')}: {value}")
    return "\n".join(lines)
