"""What --timing-log-level 1 and 2 cost a training step, against level 0 (no timers at all).

    python bench/timers_overhead.py [--layers 4] [--hidden 128] [--seq 128] [--micro 4] [--global-batch 32]
                                    [--rounds 5] [--steps 4]

The demo model's sizes (examples/run_cpu_demo.sh: 4 x 128, seq 128, micro-batch 4, global batch 32, GPT-2
vocabulary) on 2 gloo ranks at PP 2, so level 2 times every micro-batch's compute and pipeline exchange. Each rank
builds one trainer per level and the levels take turns (rounds x steps per level, interleaved) so the machine's
load drifts over all three alike; the table shows the median step time of the last rank and the end-of-interval
cost of gathering the timers (one all-gather, paid once per --log-interval, not per step). On CPU no timer
synchronizes anything: level 1 adds its barriers (one-element all-reduces), level 2 only clock reads.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from _common import REPO, load_average, print_table

sys.path.insert(0, str(REPO / "tests"))
from distributed import run_distributed  # noqa: E402


def _rank(args: argparse.Namespace) -> dict:
    from megagpt.training import config_for_test, setup

    trainers = {}
    for level in (0, 1, 2):
        config = config_for_test(
            num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4, seq_length=args.seq,
            max_position_embeddings=args.seq, vocab_size=50257, hidden_dropout=0.0, attention_dropout=0.0,
            pipeline_model_parallel_size=2, micro_batch_size=args.micro, global_batch_size=args.global_batch,
            train_iters=args.rounds * args.steps + 1, eval_interval=0, eval_iters=0, mock_data=True,
            tokenizer_type="ByteTokenizer", timing_log_level=level)
        trainer, ps = setup(config, log=False)
        trainer.train_step()                                   # warm-up (optimizer state, first allocations)
        trainer.timers.gather()
        trainers[level] = trainer
    steps: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for _ in range(args.rounds):
        for level, trainer in trainers.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                trainer.train_step()
                steps[level].append(time.perf_counter() - t0)
    gather_ms = {}
    for level, trainer in trainers.items():
        t0 = time.perf_counter()
        trainer.timers.gather()
        gather_ms[level] = (time.perf_counter() - t0) * 1000.0
    return {"steps": steps, "gather_ms": gather_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    print(load_average())
    last = run_distributed(_rank, 2, args, timeout_s=1800)[-1]
    base = statistics.median(last["steps"][0])
    rows = []
    for level in (0, 1, 2):
        step = statistics.median(last["steps"][level])
        rows.append([level, f"{step * 1000:.1f}", f"{(step / base - 1) * 100:+.1f}%", f"{last['gather_ms'][level]:.2f}"])
    print_table(["level", "step ms (median)", "vs level 0", "gather ms / interval"], rows)
    print(load_average())


if __name__ == "__main__":
    main()
