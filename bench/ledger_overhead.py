"""What the collective ledger costs a training step (#12: it must stay under 1%).

    python bench/ledger_overhead.py [--layers 4] [--hidden 256] [--seq 128] [--micro 4] [--microbatches 4]

The ledger (megagpt/diagnostics/ledger.py) adds a record before and a mark after every collective and p2p call.
On 4 gloo ranks at TP2 x PP2 a small GPT trains a few steps through `megagpt.training`; per rank it reports:
  calls/step   ledger entries one step makes (from the ledger's own counters)
  step ms      median step time (with the ledger, as it always runs)
  record us    median cost of one begin+end pair, timed in the same process on a group the ledger already knows
  overhead %   calls/step x record us / step ms
The overhead is computed, not measured as a difference of step times: two step-time medians on a shared CPU differ
by more than the 0.01% the ledger costs, so their difference would measure the machine's noise, not the ledger.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from _common import REPO, load_average, print_table

sys.path.insert(0, str(REPO / "tests"))
from distributed import run_distributed  # noqa: E402


def _rank(layers: int, hidden: int, seq: int, micro: int, microbatches: int, steps: int) -> dict:
    import torch.distributed as dist
    from megagpt.diagnostics.ledger import LEDGER
    from megagpt.training import config_for_test, setup
    config = config_for_test(
        num_layers=layers, hidden_size=hidden, num_attention_heads=4, seq_length=seq, max_position_embeddings=seq,
        vocab_size=1000, hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=2,
        pipeline_model_parallel_size=2, micro_batch_size=micro, global_batch_size=micro * microbatches,
        train_iters=steps + 1, eval_interval=0, eval_iters=0, mock_data=True, tokenizer_type="ByteTokenizer",
        watchdog_timeout_seconds=0)
    trainer, ps = setup(config, log=False)
    trainer.train_step()                                # warm-up
    times, calls = [], []
    for i in range(steps):
        before = sum(LEDGER.counts.values())
        dist.barrier()
        start = time.perf_counter()
        LEDGER.set_iteration(i + 2)
        trainer.train_step()
        times.append(time.perf_counter() - start)
        calls.append(sum(LEDGER.counts.values()) - before)
    tensor = torch.zeros(seq, micro, hidden)
    cost = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(2000):
            LEDGER.end(LEDGER.begin("all_reduce", ps.tp_group, tensor))
        cost.append((time.perf_counter() - start) / 2000)
    return dict(rank=ps.rank, calls=statistics.median(calls), step=statistics.median(times),
                record=statistics.median(cost))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    results = run_distributed(_rank, 4, a.layers, a.hidden, a.seq, a.micro, a.microbatches, a.steps)
    rows = [(r["rank"], int(r["calls"]), f"{r['step'] * 1e3:.1f}", f"{r['record'] * 1e6:.2f}",
             f"{100 * r['calls'] * r['record'] / r['step']:.4f}") for r in results]
    print_table(["rank", "calls/step", "step ms", "record us", "overhead %"], rows,
                title=f"collective ledger at TP2 x PP2, L={a.layers} h={a.hidden} s={a.seq} b={a.micro} "
                      f"m={a.microbatches} (load {load_average()})")


if __name__ == "__main__":
    main()
