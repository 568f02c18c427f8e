"""Hang forensics: each rank's report file, and the one summary that names who did not arrive where.

At a hang every rank's ledger head (diagnostics/ledger.py: its count of calls per group and its latest entries)
reaches one rank over the launcher's store (watchdog.py). `summarize` reads them the way a person would:

* a rank that sent no head at all has exited or cannot reach the store (killed, crashed, node lost);
* in each group, ranks whose count is below the others' did not reach the collective the others wait in; such a
  rank that is inside no collective at all is the root of the hang (stuck in computation, a kernel, I/O);
* when the ranks of a group made as many calls but at different places (iteration, pipeline instruction), the rank
  ahead skipped a collective of that group earlier, or the others made an extra one: the calls no longer pair up.

It is a pure function of the heads, so it is unit-tested without processes.
"""
from __future__ import annotations

import faulthandler
import os
import time
from typing import Optional

from megagpt.diagnostics.ledger import Ledger, describe


def group_name(key: str) -> str:
    """'g:0,1' -> 'group [0, 1]'; 'p2p:2>3' -> 'p2p 2->3'."""
    kind, ranks = key.split(":", 1)
    return f"p2p {ranks.replace('>', '->')}" if kind == "p2p" else f"group [{ranks.replace(',', ', ')}]"


def _members(key: str) -> list[int]:
    return [int(r) for r in key.split(":", 1)[1].replace(">", ",").split(",")]


def _entry(head: dict, key: str, seq: int) -> Optional[dict]:
    return next((e for e in head["tail"] if e["key"] == key and e["seq"] == seq), None)


def _where(head: dict) -> str:
    """Where a rank is: inside which call, or outside any."""
    if head.get("open"):
        return f"waits in {group_name(head['open']['key'])} #{head['open']['seq']}: {describe(head['open'])}"
    where = f"iteration {head['iteration']}"
    if head.get("instruction"):
        where += f", after {head['instruction']} mb {head['microbatch']}"
    return f"is inside no collective ({where}): blocked in computation, I/O or a kernel"


def _lagging(heads: dict[int, dict], key: str) -> tuple[list[int], list[int], int]:
    """(ranks behind, ranks ahead, count of those ahead) in one group or p2p direction."""
    if key.startswith("p2p:"):
        src, dst = _members(key)
        if src not in heads or dst not in heads:
            return [], [], 0
        sent, received = heads[src]["counts"].get(key, 0), heads[dst]["counts"].get(key, 0)
        if sent == received:
            return [], [], 0
        return ([src], [dst], received) if sent < received else ([dst], [src], sent)
    counts = {r: heads[r]["counts"].get(key, 0) for r in _members(key) if r in heads}
    top = max(counts.values(), default=0)
    return [r for r, n in counts.items() if n < top], [r for r, n in counts.items() if n == top], top


def _signature(entry: dict) -> tuple:
    return entry["op"], tuple(entry["shape"]), entry["dtype"], entry["iteration"], entry["index"]


def _diverged(heads: dict[int, dict], key: str) -> Optional[tuple[int, list[int], dict[int, dict]]]:
    """The first call number of a collective group whose entries differ in place (iteration and instruction
    position) or kind between the ranks: (seq, ranks ahead, entries). A rank is ahead when its call #seq is the
    others' call #seq+1 (it skipped one), else when its place is the latest."""
    members = [r for r in _members(key) if r in heads]
    by_rank = {r: {e["seq"]: e for e in heads[r]["tail"] if e["key"] == key} for r in members}
    common = set.intersection(*(set(d) for d in by_rank.values())) if by_rank else set()
    for seq in sorted(common):
        entries = {r: by_rank[r][seq] for r in members}
        if len({_signature(e) for e in entries.values()}) == 1:
            continue
        skipped = [r for r in members if all(seq + 1 in by_rank[o] and _signature(by_rank[o][seq + 1]) ==
                                             _signature(entries[r]) for o in members if o != r)]
        places = {r: (e["iteration"], e["index"]) for r, e in entries.items()}
        latest = max(places.values())
        ahead = skipped or ([r for r in members if places[r] == latest] if len(set(places.values())) > 1 else [])
        return seq, ahead, entries
    return None


def summarize(heads: dict[int, Optional[dict]], world_size: int) -> str:
    """One text naming the rank(s) at fault and where the others wait (see the module docstring)."""
    alive = {r: h for r, h in heads.items() if h is not None}
    missing = [r for r in range(world_size) if r not in alive]
    lines, roots, ahead, behind_any = [], [], [], []
    keys = sorted({k for h in alive.values() for k in h["counts"]})
    for key in keys:
        behind, waiting, top = _lagging(alive, key)
        if not behind:
            continue
        behind_any += [r for r in behind if r not in behind_any]
        call = next((e for e in (_entry(alive[w], key, top - 1) for w in waiting) if e), None)
        what = f"{describe(call)}" if call else "a call no longer in the ledger"
        lines.append(f"{group_name(key)}: rank(s) {behind} did not reach call #{top - 1}, {what}, which rank(s) "
                     f"{waiting} entered")
        for r in behind:
            lines.append(f"    rank {r} {_where(alive[r])}")
            if not alive[r].get("open") and r not in roots:
                roots.append(r)
    for key in (k for k in keys if k.startswith("g:")):
        found = _diverged(alive, key)
        if found:
            seq, first, entries = found
            ahead += [r for r in first if r not in ahead]
            lines.append(f"{group_name(key)}: call #{seq} differs between the ranks, so calls no longer pair up: "
                         + "; ".join(f"rank {r}: {describe(e)}" for r, e in entries.items()))
            if first:
                lines.append(f"    rank(s) {first} are ahead: they skipped a collective of this group at #{seq} "
                             f"(or the others made an extra one)")
    iterations = sorted({h["iteration"] for h in alive.values()})
    if missing:
        head = (f"rank(s) {missing} did not answer: exited or cannot reach the store (killed?); the others were at "
                f"iteration {iterations[-1] if iterations else '?'}")
    elif roots:
        head = "rank(s) " + ", ".join(f"{r} (iteration {alive[r]['iteration']})" for r in roots) + \
               " stopped outside any collective while the others wait for them"
    elif ahead:
        head = "rank(s) " + ", ".join(f"{r} (iteration {alive[r]['iteration']})" for r in ahead) + \
               " skipped a collective: the ranks' calls no longer pair up"
    elif behind_any:
        head = "rank(s) " + ", ".join(f"{r} (iteration {alive[r]['iteration']})" for r in behind_any) + \
               " are behind their groups"
    else:
        head = "every rank made the same calls; none is behind (a backend or network stall?)"
    body = [f"  rank {r}: {h.get('reason', '')}; {_where(h)}" for r, h in sorted(alive.items())]
    return "\n".join([f"megagpt hang summary: {head}"] + ["  " + line for line in lines] + ["  per rank:"] + body)


def write_rank_report(directory: str, rank: int, reason: str, ledger: Ledger) -> str:
    """hang_report/rank_XXXXX.txt: why, the Python stack of every thread (faulthandler), and the ledger tail."""
    folder = os.path.join(directory, "hang_report")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"rank_{rank:05d}.txt")
    with open(path, "w") as f:
        f.write(f"megagpt hang report: rank {rank}, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                f"reason: {reason}\nledger: iteration {ledger.iteration}, "
                f"last instruction {ledger.instruction} mb {ledger.microbatch}\n\nPython stacks:\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.write(f"\nlast {min(64, len(ledger.entries))} collective calls (#seq per group):\n{ledger.tail_text()}\n")
    return path
