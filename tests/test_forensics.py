"""Hang forensics (#12): the fault-injection grammar, the collective ledger, the summary's reading of ledger heads,
and, on real gloo processes at TP2 x PP2, a hang, a killed rank and a skipped collective: every rank ends within
the watchdog timeout + 30 s with a non-zero exit code, each writes hang_report/rank_XXXXX.txt, and the summary
names the injected rank and iteration."""
from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from distributed import LOCK_PATH
from megagpt.diagnostics.faults import ENV, Fault, FaultPlan, parse_faults
from megagpt.diagnostics.forensics import summarize
from megagpt.diagnostics.ledger import Ledger
from megagpt.diagnostics.watchdog import EXIT_CODE
from megagpt.parallel.launch import free_port
from model_utils import tiny_cli

TIMEOUT_S = 3.0


def test_fault_grammar_is_strict():
    assert parse_faults("hang:rank=1:iteration=3, kill:rank=2:iteration=5;nan:rank=0:iteration=1") == [
        Fault("hang", 1, 3), Fault("kill", 2, 5), Fault("nan", 0, 1)]
    for bad in ("hang:rank=1", "freeze:rank=1:iteration=2", "nan:rank=1:iter=2", "nan:rank=1:iteration=2:x=1"):
        with pytest.raises(ValueError, match=ENV):
            parse_faults(bad)
    plan = FaultPlan(parse_faults("skip-collective:rank=0:iteration=2,spike:rank=0:iteration=2"), rank=0)
    assert not plan.before_collective("all_reduce", 1) and not plan.before_collective("broadcast", 2)
    assert plan.before_collective("all_reduce", 2) and not plan.before_collective("all_reduce", 2)   # once
    assert float(plan.poison(torch.tensor(2.0), 2)) == 200.0 == float(plan.poison(torch.tensor(2.0), 2))
    assert float(plan.poison(torch.tensor(2.0), 3)) == 2.0
    assert FaultPlan(parse_faults("nan:rank=1:iteration=2"), rank=0).pending == []


def test_ledger_counts_per_group_and_direction():
    ledger = Ledger(capacity=4)
    ledger._rank = 1
    ledger.set_iteration(7)
    ledger.set_instruction("forward", 3)
    ledger._keys[id(None)] = (None, "g:0,1")
    for _ in range(3):
        ledger.end(ledger.begin("all_reduce", None, torch.zeros(2, 3)))
    open_entry = ledger.begin_p2p("recv", torch.zeros(4), peer=0)
    ledger.begin_p2p("send", torch.zeros(4), peer=0)
    head = ledger.head()
    assert head["counts"] == {"g:0,1": 3, "p2p:0>1": 1, "p2p:1>0": 1}
    assert len(head["tail"]) == 4                            # the ring keeps the last `capacity` entries
    assert head["open"]["key"] == "p2p:1>0" and open_entry.done is False
    assert head["tail"][0] == {**head["tail"][0], "seq": 1, "op": "all_reduce", "shape": [2, 3], "iteration": 7,
                               "instruction": "forward", "microbatch": 3, "done": True}


def _entry(key, seq, op="all_reduce", iteration=3, index=1, done=True, shape=(4,)):
    return {"key": key, "seq": seq, "op": op, "shape": list(shape), "dtype": "float32", "iteration": iteration,
            "index": index, "instruction": "forward", "microbatch": 0, "done": done, "async": False}


def _head(rank, counts, tail, open_entry=None, iteration=3):
    return {"rank": rank, "iteration": iteration, "instruction": "forward", "microbatch": 0, "index": 1,
            "counts": counts, "open": open_entry, "tail": tail, "reason": "no progress"}


def test_summary_names_the_rank_outside_any_collective():
    key = "g:0,1"
    waiting = _entry(key, 5, done=False)
    heads = {0: _head(0, {key: 6}, [_entry(key, 4), waiting], open_entry=waiting),
             1: _head(1, {key: 5}, [_entry(key, 4)])}
    text = summarize(heads, 2)
    assert text.splitlines()[0] == ("megagpt hang summary: rank(s) 1 (iteration 3) stopped outside any collective "
                                    "while the others wait for them")
    assert "group [0, 1]: rank(s) [1] did not reach call #5, all_reduce [4] float32 (iteration 3, forward mb 0)" in text


def test_summary_names_a_dead_rank_and_a_skipped_collective():
    assert summarize({0: _head(0, {}, []), 1: None}, 2).startswith(
        "megagpt hang summary: rank(s) [1] did not answer: exited or cannot reach the store (killed?); the others "
        "were at iteration 3")
    key = "g:0,1"   # rank 1 skipped call #1 (shape (2,)): its #1 is rank 0's #2
    r0 = [_entry(key, 0), _entry(key, 1, shape=(2,)), _entry(key, 2), _entry(key, 3, done=False)]
    r1 = [_entry(key, 0), _entry(key, 1), _entry(key, 2, op="broadcast", done=False)]
    text = summarize({0: _head(0, {key: 4}, r0, r0[-1]), 1: _head(1, {key: 3}, r1, r1[-1])}, 2)
    assert text.splitlines()[0] == ("megagpt hang summary: rank(s) 1 (iteration 3) skipped a collective: the ranks' "
                                    "calls no longer pair up")
    assert "rank(s) [1] are ahead: they skipped a collective of this group at #1" in text


# ---- real processes ------------------------------------------------------------------------------------------
def _launch(tmp_path, fault: str, *extra: str, world: int = 4, iters: int = 6) -> tuple[list[int], list[str], float]:
    """examples/pretrain_gpt.py on `world` gloo ranks at TP2 x PP2 with a fault injected; (exit codes, outputs,
    seconds from the fault to the last exit). Every rank is killed if it outlives the test's bound."""
    args = tiny_cli(global_batch_size=4, train_iters=iters) + [
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--lr-decay-iters", "10",
        "--watchdog-timeout-seconds", str(TIMEOUT_S), "--save", str(tmp_path), *extra]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env[ENV] = fault
    with open(LOCK_PATH, "w") as lock:       # one process group at a time on this machine (tests/distributed.py)
        fcntl.flock(lock, fcntl.LOCK_EX)
        start = time.monotonic()
        procs = [subprocess.Popen(args, env=dict(env, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
        outs = []
        try:
            for p in procs:
                outs.append(p.communicate(timeout=max(1.0, start + 120 - time.monotonic()))[0])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        ended = time.time()
    faulted = [float(t) for o in outs for t in re.findall(r"injected fault: .* \(time ([\d.]+)\)", o)]
    assert faulted, outs[-1][-3000:]
    return [p.returncode for p in procs], outs, ended - faulted[0]


@pytest.mark.slow
@pytest.mark.parametrize("fault, rank, headline", [
    ("hang", 1, "rank(s) 1 (iteration 3) stopped outside any collective while the others wait for them"),
    ("kill", 2, "rank(s) [2] did not answer: exited or cannot reach the store (killed?); the others were at "
                "iteration 3"),
    ("skip-collective", 1, "rank(s) 1 (iteration 3) skipped a collective: the ranks' calls no longer pair up"),
])
def test_injected_fault_is_named_and_every_rank_exits(tmp_path, fault, rank, headline):
    codes, outs, seconds = _launch(tmp_path, f"{fault}:rank={rank}:iteration=3")
    assert all(code != 0 for code in codes), codes
    assert codes[rank] == (137 if fault == "kill" else EXIT_CODE)
    summary = (tmp_path / "hang_report" / "summary.txt").read_text()
    assert summary.splitlines()[0] == f"megagpt hang summary: {headline}", summary
    assert sum("megagpt hang summary" in o for o in outs) == 1          # one rank prints it
    reports = sorted(p.name for p in (tmp_path / "hang_report").glob("rank_*.txt"))
    assert reports == [f"rank_{r:05d}.txt" for r in range(4) if not (fault == "kill" and r == rank)]
    if fault == "hang":      # the stuck rank's report shows where it is stuck, and its ledger
        text = (tmp_path / "hang_report" / f"rank_{rank:05d}.txt").read_text()
        assert "in before_collective" in text and re.search(r"#\d+\s+g:0,1\s+done\s+all_reduce", text)
        heads = json.loads((tmp_path / "hang_report" / "heads.json").read_text())
        assert sorted(heads) == ["0", "1", "2", "3"]
    assert seconds < TIMEOUT_S + 30, seconds             # from the fault to the last rank's exit
