"""Measure this machine for the planner's `--cluster cpu-here`: matmul rate, memory bandwidth, gloo bandwidth.

Why measured and not looked up: a CPU's FLOP/s depends on its vector units, threads and neighbours, and gloo's
loopback bandwidth on the kernel, so the only honest numbers are this machine's own. Kept out of megagpt/plan (pure
arithmetic): this module runs torch and a 2-process gloo group.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megagpt.parallel.launch import free_port
from megagpt.plan.cluster import Cluster


def matmul_rate(sizes: Sequence[int] = (1024, 1536, 2048), reps: int = 5) -> tuple[float, float, int]:
    """Best fp32 FLOP/s of torch.mm on square matrices (2 n^3 FLOPs per product) with the current thread count.

    Best-of is the honest ceiling on a shared machine: the fastest run is the one least disturbed by neighbours.
    Returns (FLOP/s by wall clock, FLOP/s by process CPU time / threads, n of the best wall-clock run).
    """
    best, best_cpu, best_n = 0.0, 0.0, sizes[0]
    threads = torch.get_num_threads()
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        a = torch.randn(n, n, generator=gen)
        b = torch.randn(n, n, generator=gen)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm-up (page faults, packing buffers)
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            torch.mm(a, b, out=out)
            rate = 2.0 * n ** 3 / (time.perf_counter() - t0)
            best_cpu = max(best_cpu, 2.0 * n ** 3 / max((time.process_time() - c0) / threads, 1e-9))
            if rate > best:
                best, best_n = rate, n
    return best, best_cpu, best_n


def memory_bandwidth(numel: int = 8 * 2 ** 20, reps: int = 5) -> float:
    """Best bytes/s of an fp32 add (read two tensors, write one): what elementwise ops and the optimizer see."""
    a, b, out = torch.ones(numel), torch.ones(numel), torch.empty(numel)
    torch.add(a, b, out=out)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.add(a, b, out=out)
        best = max(best, 3 * 4 * numel / (time.perf_counter() - t0))
    return best


def _gloo_worker(rank: int, port: int, nbytes: int, reps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        big, small = torch.ones(nbytes // 4), torch.ones(1)
        times, lat = [], []
        for i in range(reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(big)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dist.all_reduce(small)
            lat.append(time.perf_counter() - t0)
        if rank == 0:
            queue.put((min(times[1:]), min(lat[1:])))
    finally:
        dist.destroy_process_group()


def gloo_bandwidth(nbytes: int = 16 * 2 ** 20, reps: int = 5) -> tuple[float, float]:
    """(bus bandwidth in bytes/s, latency in s) of a 2-process gloo all-reduce on loopback (busbw = B / t for n=2)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gloo_worker, args=(r, port, nbytes, reps, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    seconds, latency = queue.get(timeout=300)
    for p in procs:
        p.join(30)
    return nbytes / seconds, latency


def measure_cpu_cluster(num_gpus: int = 2, threads_per_rank: int = 1) -> Cluster:
    """This machine as a cluster of `num_gpus` CPU ranks of `threads_per_rank` threads each (one node)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads_per_rank)
    try:
        flops, _, _ = matmul_rate((512, 1024))
        mem_bw = memory_bandwidth()
    finally:
        torch.set_num_threads(previous)
    busbw, latency = gloo_bandwidth()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return Cluster(num_gpus=num_gpus, gpus_per_node=num_gpus, gpu_memory_gib=ram / num_gpus,
                   gpu_peak_tflops=flops / 1e12, intra_node_gbps=busbw / 1e9, inter_node_gbps=busbw / 1e9,
                   achievable_mfu=1.0, memory_gbps=mem_bw / 1e9, latency_us=latency * 1e6, device="cpu",
                   runtime_gib=0.0, fragmentation=0.0, name="cpu-here")
