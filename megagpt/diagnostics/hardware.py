"""Measure this machine for the planner's `--cluster cpu-here`: GEMM, attention and elementwise rates, memory
bandwidth, gloo latency and bandwidth, host overhead per layer.

Why measured and not looked up: a CPU's FLOP/s depends on its vector units, threads and neighbours, and gloo's
loopback bandwidth on the kernel, so the only honest numbers are this machine's own. Kept out of megagpt/plan (pure
arithmetic): this module runs torch and a 2-process gloo group.
"""
from __future__ import annotations

import os
import statistics
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


def layer_gemm_rate(hidden_sizes: Sequence[int] = (256, 512, 1024), tokens: int = 512, reps: int = 5) -> float:
    """fp32 FLOP/s of one GPT layer's GEMMs as the trainer runs them: forward x W^T, input grad g W and weight grad
    g^T x of QKV (3h), projection (h), fc1 (4h) and fc2 (from 4h), on `tokens` rows. Best of `reps` per hidden
    size, median over the sizes.

    Why not square matrices: the trainer's GEMMs are rectangular with a transposed operand in two of the three;
    their rate, not the square ceiling, is what a step pays."""
    rates = []
    for h in hidden_sizes:
        gen = torch.Generator().manual_seed(h)
        weights = [torch.randn(out, inp, generator=gen) for out, inp in ((3 * h, h), (h, h), (4 * h, h), (h, 4 * h))]
        xs = [torch.randn(tokens, w.shape[1], generator=gen) for w in weights]     # [T, in]
        gs = [torch.randn(tokens, w.shape[0], generator=gen) for w in weights]     # [T, out]

        def layer() -> None:
            for w, x, g in zip(weights, xs, gs):
                torch.mm(x, w.t())      # forward    [T, out]
                torch.mm(g, w)          # input grad [T, in]
                torch.mm(g.t(), x)      # weight grad [out, in]
        layer()
        flops = sum(3 * 2.0 * tokens * w.numel() for w in weights)
        rates.append(flops / min(_timed(layer) for _ in range(reps)))
    return statistics.median(rates)


def attention_rate(shapes: Sequence[tuple[int, int, int, int]] = ((4, 8, 128, 32), (2, 8, 256, 64)),
                   reps: int = 5) -> float:
    """FLOP/s of causal scaled_dot_product_attention forward + backward (the flash backend's core) on [b, a, s, d]
    shapes, counted as the planner counts the core (4 s^2 h per layer forward, x3 with backward, causal half not
    discounted). Mean over the shapes of the best of `reps`."""
    rates = []
    for b, a, s, d in shapes:
        gen = torch.Generator().manual_seed(s)
        q, k, v = (torch.randn(b, a, s, d, generator=gen).requires_grad_() for _ in range(3))  # [b, a, s, d]

        def core() -> None:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)   # [b, a, s, d]
            out.backward(torch.ones_like(out))
        core()
        rates.append(3 * 4.0 * b * s * s * a * d / min(_timed(core) for _ in range(reps)))
    return sum(rates) / len(rates)


def elementwise_bandwidth(tokens: int = 512, hidden: int = 256, reps: int = 5) -> float:
    """Bytes/s the layer's elementwise kernels reach: LayerNorm on [T, h], GELU on [T, 4h] and a residual add,
    forward and backward, over the bytes they read and write (forward: inputs and output; backward: output grad,
    saved input and input grad; the add's backward moves nothing).

    Why not a plain add: GELU's erf and LayerNorm's reductions are compute-bound on a CPU core, so they run far
    below memory bandwidth, and they, not the copy rate, are what the elementwise part of a step pays."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).requires_grad_()          # [T, h]
    u = torch.randn(tokens, 4 * hidden, generator=gen).requires_grad_()      # [T, 4h]
    norm = torch.nn.LayerNorm(hidden)

    def ops() -> None:
        y = norm(x) + x                                                      # [T, h]
        z = torch.nn.functional.gelu(u)                                      # [T, 4h]
        torch.autograd.backward([y, z], [torch.ones_like(y), torch.ones_like(z)])
    ops()
    th, tf = tokens * hidden * 4, tokens * 4 * hidden * 4
    nbytes = (2 * th + 3 * th) + (2 * tf + 3 * tf) + 3 * th   # LayerNorm, GELU (fwd + bwd), residual add (fwd)
    return nbytes / min(_timed(ops) for _ in range(reps))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _gloo_worker(rank: int, port: int, nbytes: int, reps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        big, small = torch.ones(nbytes // 4), torch.ones(1024)
        a = torch.randn(384, 384)
        times: dict[int, list[float]] = {big.numel(): [], small.numel(): []}
        calls = [small] * 15 * reps + [big] * reps
        for i, tensor in enumerate([small] + calls):       # the first call warms the connection up
            torch.mm(a, a)          # ~1 ms of work between calls, as the trainer's layers do
            t0 = time.perf_counter()
            dist.all_reduce(tensor)
            if i:
                times[tensor.numel()].append(time.perf_counter() - t0)
        if rank == 0:
            queue.put((statistics.mean(times[big.numel()]), statistics.mean(times[small.numel()])))
    finally:
        dist.destroy_process_group()


def gloo_bandwidth(nbytes: int = 8 * 2 ** 20, reps: int = 20) -> tuple[float, float]:
    """(bus bandwidth in bytes/s, latency in s) of a 2-process gloo all-reduce on loopback (busbw = B / t for n=2).

    Latency is the mean time of a 4 KiB all-reduce issued between bursts of compute, as the trainer issues its TP
    all-reduces and p2p sends: each call pays waking the peer's gloo threads (on this virtual machine a bimodal
    0.3 or 1.5 ms; best-of after a barrier said 0.2 ms, 8x too optimistic for a TP step) and the ranks' arrival
    skew. The mean, not a best-of or the median, because a step pays the sum of its calls. Bandwidth is the mean
    large all-reduce less that latency."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gloo_worker, args=(r, port, nbytes, reps, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    seconds, latency = queue.get(timeout=300)
    for p in procs:
        p.join(30)
    return nbytes / max(seconds - latency, 1e-6), latency


def _host_worker(port: int, layers: Sequence[int], reps: int, queue) -> None:
    from megagpt.config import ModelConfig
    from megagpt.model.gpt import build_model_chunks
    from megagpt.parallel import random as tp_random
    from megagpt.parallel.state import ParallelState
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=120))
    try:
        seconds = []
        for n in layers:
            config = ModelConfig(num_layers=n, hidden_size=64, num_attention_heads=4, seq_length=16,
                                 max_position_embeddings=16, vocab_size=128, hidden_dropout=0.0, attention_dropout=0.0)
            model = build_model_chunks(config, ParallelState(1, 1), seed=1,
                                       tracker=tp_random.model_parallel_seed(1, 0, 0, "cpu"))[0]
            tokens = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))   # [b, s]

            def step() -> None:
                model(tokens=tokens, labels=tokens).mean().backward()
            step()
            seconds.append(statistics.median(_timed(step) for _ in range(reps)))
        queue.put(seconds)
    finally:
        dist.destroy_process_group()


def host_overhead(layers: tuple[int, int] = (1, 5), reps: int = 15) -> tuple[float, float]:
    """(seconds per transformer layer, seconds per micro-batch outside the layers) of one micro-batch's forward +
    backward through megagpt's GPT at width 64 and 16 tokens, where the kernels' work is negligible: what is left
    is Python, operator dispatch and autograd, which a CPU pays serially. Two depths give the slope and the
    intercept. (A GPU launches kernels asynchronously, so its host runs ahead and this is hidden.)"""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_host_worker, args=(free_port(), layers, reps, queue), daemon=True)
    proc.start()
    short, deep = queue.get(timeout=300)
    proc.join(30)
    per_layer = max(deep - short, 0.0) / (layers[1] - layers[0])
    return per_layer, max(short - layers[0] * per_layer, 0.0)


RATES = (layer_gemm_rate, attention_rate, elementwise_bandwidth, memory_bandwidth)


def _rates_worker(rank: int, threads: int, barrier, queue) -> None:
    torch.set_num_threads(threads)
    rates = []
    for measure in RATES:
        barrier.wait()              # every rank runs the same kernel at once, as in a step
        rates.append(measure())
    queue.put(rates)


def concurrent_rates(ranks: int, threads: int) -> list[float]:
    """RATES measured in `ranks` processes at once, mean over them: a job's ranks share the last-level cache, the
    memory system and the power budget, so a rank alone on an idle machine can run faster than in a step. (On the
    2-vCPU machine of bench/RESULTS.md the best-of rates came out the same alone and in pairs.)"""
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(ranks)
    procs = [ctx.Process(target=_rates_worker, args=(r, threads, barrier, queue), daemon=True) for r in range(ranks)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(30)
    return [sum(r[k] for r in results) / ranks for k in range(len(RATES))]


def measure_cpu_cluster(num_gpus: int = 2, threads_per_rank: int = 1) -> Cluster:
    """This machine as a cluster of `num_gpus` CPU ranks of `threads_per_rank` threads each (one node): the GEMM
    rate at a layer's shapes, the attention core's rate, the elementwise kernels' and the copy bandwidth (all with
    the ranks running at once, as many as the cores hold), gloo's per-call latency and bandwidth, and the host
    time per layer and per micro-batch."""
    ranks = max(1, min(num_gpus, (os.cpu_count() or 1) // threads_per_rank))
    flops, attention, elementwise, mem_bw = concurrent_rates(ranks, threads_per_rank)
    busbw, latency = gloo_bandwidth()
    per_layer, per_microbatch = host_overhead()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return Cluster(num_gpus=num_gpus, gpus_per_node=num_gpus, gpu_memory_gib=ram / num_gpus,
                   gpu_peak_tflops=flops / 1e12, intra_node_gbps=busbw / 1e9, inter_node_gbps=busbw / 1e9,
                   achievable_mfu=1.0, memory_gbps=mem_bw / 1e9, latency_us=latency * 1e6, device="cpu",
                   elementwise_gbps=elementwise / 1e9, attention_tflops=attention / 1e12,
                   layer_overhead_us=per_layer * 1e6, microbatch_overhead_us=per_microbatch * 1e6,
                   runtime_gib=0.0, fragmentation=0.0, name="cpu-here")
