#!/usr/bin/env python3
"""Predicted (plan, --cluster cpu-here) against measured step time for three 2-rank layouts on this machine.

    python bench/plan_check.py

Prints a table; asserts nothing (timings on a shared machine are not a test). Each rank runs 1 thread, as the
measured cpu-here cluster assumes.
"""
from __future__ import annotations

import os
import statistics
import time

import torch.multiprocessing as mp

from _common import load_average, print_table  # noqa: F401 (puts the repo on sys.path)
from megagpt.diagnostics.hardware import measure_cpu_cluster
from megagpt.parallel.launch import free_port
from megagpt.plan.step_time import step_time
from megagpt.training import config_for_test

LAYOUTS = {"DP 2": {}, "TP 2": dict(tensor_model_parallel_size=2), "PP 2": dict(pipeline_model_parallel_size=2)}
ITERS, WARMUP = 8, 2


def _config(**layout):
    return config_for_test(num_layers=4, hidden_size=256, num_attention_heads=8, seq_length=128,
                           max_position_embeddings=128, vocab_size=2048, hidden_dropout=0.0, attention_dropout=0.0,
                           micro_batch_size=4, global_batch_size=16, train_iters=ITERS, eval_interval=0,
                           eval_iters=0, log_interval=ITERS, mock_data=True, tokenizer_type="ByteTokenizer",
                           num_threads=1, **layout)


def _worker(rank, port, layout, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megagpt.training import setup
    config = _config(**layout)
    config.model.vocab_size = 2048
    trainer, ps = setup(config, log=False)
    times = []
    for _ in range(ITERS):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        queue.put(statistics.median(times[WARMUP:]))   # the median step: robust to a neighbour's burst


def measure(layout) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, layout, queue)) for r in range(2)]
    for p in procs:
        p.start()
    seconds = queue.get(timeout=600)
    for p in procs:
        p.join(60)
    return seconds


def main() -> None:
    print(load_average())
    cluster = measure_cpu_cluster(2)
    print(f"cpu-here: host {cluster.layer_overhead_us:.0f} us per layer, {cluster.microbatch_overhead_us:.0f} us "
          f"per micro-batch; GEMM {cluster.gpu_peak_tflops * 1e3:.1f} GFLOP/s per rank, attention core "
          f"{cluster.attention_tflops * 1e3:.1f} GFLOP/s, elementwise {cluster.elementwise_gbps:.1f} GB/s, memory "
          f"{cluster.memory_gbps:.1f} GB/s, gloo {cluster.intra_node_gbps:.2f} GB/s, "
          f"latency {cluster.latency_us:.0f} us")
    rows, terms = [], {}
    for name, layout in LAYOUTS.items():
        config = _config(**layout)
        config.model.vocab_size = 2048
        predicted = step_time(config, 2, cluster)
        terms[name] = predicted.terms
        measured = measure(layout)
        rows.append([name, f"{predicted.total * 1e3:.1f}", f"{measured * 1e3:.1f}",
                     f"{(predicted.total - measured) / measured * 100:+.0f}%"])
    print(load_average())
    print_table(["layout", "predicted ms", "measured ms", "error"], rows,
                title="step time, 4 layers h=256 s=128, micro-batch 4, global batch 16, 2 ranks x 1 thread")
    names = [k for k in next(iter(terms.values())) if any(t.get(k) for t in terms.values())]
    print_table(["predicted term (ms)"] + list(terms), [[k] + [f"{t.get(k, 0.0) * 1e3:.1f}" for t in terms.values()]
                                                        for k in names])


if __name__ == "__main__":
    main()
