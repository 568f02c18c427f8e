"""What a checkpoint save costs the training loop: synchronous vs --async-save, on the demo model.

    python bench/async_save.py [--iters 12] [--save-at 4] [--threads 2]

One rank (gloo), the `make demo` model shape (L=4 h=128 heads=4 s=128, b=4 x 8 micro-batches, GPT-2 vocabulary,
fp32, ~13 M parameters incl. Adam state ~150 MB on disk). Every iteration is timed the way the loop runs it
(`train_step`, then the save at `--save-at`, then `poll_save`). Reported per mode: the median iteration without a
save, the time the loop is blocked by the save call itself (sync: the whole write; async: the copy to host memory),
and the extra time of the iterations that ran while the background thread wrote (against the median: noisy on a
busy machine), each as a fraction of one iteration. Target (issue #10): async under 10% of an iteration, where
a synchronous save of the same size costs 100%+.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch

from _common import load_average, median, print_table, single_rank_env


def run(mode: str, args: argparse.Namespace, directory: str) -> dict:
    from megagpt.training import config_for_test, setup

    config = config_for_test(
        num_layers=4, hidden_size=128, num_attention_heads=4, seq_length=128, max_position_embeddings=128,
        vocab_size=50257, hidden_dropout=0.0, attention_dropout=0.0, micro_batch_size=4, global_batch_size=32,
        train_iters=args.iters, eval_interval=0, eval_iters=0, lr=1e-4, mock_data=True,
        tokenizer_type="ByteTokenizer", num_threads=args.threads, save=directory, async_save=mode == "async")
    trainer, _ = setup(config, log=False)
    times, writing, blocked = [], [], 0.0
    for iteration in range(1, args.iters + 1):
        start = time.perf_counter()
        trainer.train_step()
        if iteration == args.save_at:
            save_start = time.perf_counter()
            trainer.save(directory, iteration)
            blocked = time.perf_counter() - save_start
        in_flight = getattr(trainer.engine, "writer", None) is not None and trainer.engine.writer.in_flight
        trainer.poll_save()
        times.append(time.perf_counter() - start)
        writing.append(in_flight and iteration > args.save_at)
    trainer.poll_save(block=True)
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)
    plain = median([t for i, t in enumerate(times, 1) if i != args.save_at and not writing[i - 1] and i > 2])
    overlap = [t - plain for t, w in zip(times, writing) if w]
    return {"plain": plain, "save": blocked, "overlap": overlap, "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--save-at", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    single_rank_env()
    torch.set_num_threads(args.threads)
    rows = []
    for mode in ("sync", "async"):
        directory = tempfile.mkdtemp(prefix=f"megagpt-bench-{mode}-")
        try:
            r = run(mode, args, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        slowed = sum(r["overlap"])
        rows.append([mode, f"{r['bytes'] / 2**20:.0f}", f"{r['plain'] * 1e3:.0f}", f"{r['save'] * 1e3:.0f}",
                     f"{r['save'] / r['plain']:.0%}", f"{len(r['overlap'])}", f"{slowed * 1e3:.0f}",
                     f"{slowed / r['plain']:.0%}"])
    print_table(["mode", "checkpoint MiB", "iteration ms", "blocked by the save, ms", "of one iteration",
                 "iterations while writing", "their +ms (sum)", "+ of one iteration"], rows,
                title=f"Cost of one checkpoint save to the training loop ({load_average()})")


if __name__ == "__main__":
    main()
