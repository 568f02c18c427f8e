"""A cluster as the planner sees it: GPU count and memory, peak FLOP/s, link bandwidths, and named presets.

Why numbers and not device queries: a plan is made before the job is submitted, usually on a login node without
the GPUs. `cpu-here` is the exception: it is measured on this machine (megagpt/diagnostics/hardware.py; the
measurement needs torch and a gloo process group, so it is kept out of this pure-arithmetic package).

Bandwidths are the achievable bus bandwidth per GPU in GB/s (gigabytes), as nccl-tests reports "busbw":
a ring all-reduce of B bytes over n ranks takes 2 (n-1)/n B / busbw.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional

GIB = 2 ** 30


@dataclass(frozen=True)
class Cluster:
    """What the planner needs to know about the machines; every field is a number a user can look up."""

    num_gpus: int
    gpus_per_node: int
    gpu_memory_gib: float
    gpu_peak_tflops: float          # dense bf16/fp16 tensor-core peak (fp32 matmul rate for CPUs)
    intra_node_gbps: float          # achievable bus bandwidth inside a node, GB/s per GPU (NVLink)
    inter_node_gbps: float          # achievable bus bandwidth across nodes, GB/s per GPU (InfiniBand/RoCE)
    achievable_mfu: float           # fraction of peak the model's GEMMs reach (bubbles and exposed comm excluded)
    memory_gbps: float = 2000.0     # device memory bandwidth, GB/s: the optimizer step and elementwise ops
    latency_us: float = 20.0        # per collective or p2p message: launch and synchronisation
    elementwise_gbps: Optional[float] = None   # rate of LayerNorm/GELU/softmax/dropout/add kernels over the bytes they
    #                                            move, GB/s; None: memory_gbps (bandwidth-bound on GPUs)
    attention_tflops: Optional[float] = None   # flash attention core (FLOPs counted as 4 s^2 h per layer forward);
    #                                            None: the GEMM rate, gpu_peak_tflops x achievable_mfu
    layer_overhead_us: float = 0.0       # host time per layer per micro-batch outside the kernels (Python, dispatch,
    #                                      autograd): serial on a CPU; 0 on GPUs, whose launches run ahead
    microbatch_overhead_us: float = 0.0  # the same for a micro-batch's embedding, LM head and loss
    device: str = "cuda"            # "cuda" or "cpu": decides dropout-mask and LayerNorm-statistic dtypes
    runtime_gib: float = 1.0        # memory outside PyTorch's allocator: CUDA context, cuBLAS workspace, NCCL buffers
    fragmentation: float = 0.10     # allowance for the caching allocator's fragmentation, fraction of the total
    name: str = "custom"

    @property
    def num_nodes(self) -> int:
        return -(-self.num_gpus // self.gpus_per_node)


# Sources: NVIDIA H100 / A100 / H200 datasheets (dense BF16 tensor-core peak, HBM size and bandwidth, NVLink);
# achievable busbw from nccl-tests on DGX systems (~80% of the NVLink or 8x NIC line rate); NDR 400 Gb/s per GPU
# (DGX H100/H200), HDR 200 Gb/s per GPU (DGX A100). MFU 0.5: what Megatron-LM reports for GPT on H100/A100 GEMMs
# (Narayanan et al. 2021 reach 52% of A100 peak end to end at 1T parameters, so the GEMMs alone do at least that).
PRESETS: dict[str, Cluster] = {
    "h100-80gb": Cluster(num_gpus=8, gpus_per_node=8, gpu_memory_gib=80, gpu_peak_tflops=989, intra_node_gbps=360,
                         inter_node_gbps=40, achievable_mfu=0.5, memory_gbps=3350, name="h100-80gb"),
    "h200": Cluster(num_gpus=8, gpus_per_node=8, gpu_memory_gib=141, gpu_peak_tflops=989, intra_node_gbps=360,
                    inter_node_gbps=40, achievable_mfu=0.5, memory_gbps=4800, name="h200"),
    "a100-80gb": Cluster(num_gpus=8, gpus_per_node=8, gpu_memory_gib=80, gpu_peak_tflops=312, intra_node_gbps=230,
                         inter_node_gbps=20, achievable_mfu=0.5, memory_gbps=2039, name="a100-80gb"),
    "a100-40gb": Cluster(num_gpus=8, gpus_per_node=8, gpu_memory_gib=40, gpu_peak_tflops=312, intra_node_gbps=230,
                         inter_node_gbps=20, achievable_mfu=0.5, memory_gbps=1555, name="a100-40gb"),
}
# Latency: nccl-tests small-message all-reduce on one NVLink node is ~10-30 us (latency_us default 20). Elementwise
# kernels and flash attention keep their defaults on GPUs: NVIDIA's Deep Learning Performance guide ("Memory-Limited
# Layers") classes normalisation, activation and elementwise ops as bandwidth-bound, so they run at HBM bandwidth, and
# FlashAttention-2 reaches 50-73% of A100 peak (Dao 2023), FlashAttention-3 ~75% of H100's (Shah et al. 2024): no
# slower than the 0.5 MFU of the GEMMs. On CPUs neither holds (GELU's erf is compute-bound; the attention kernel
# runs at about half the GEMM rate), so cpu-here measures both.
MEASURED = "cpu-here"

# flag -> Cluster field; flags override the preset's numbers
FLAGS = {
    "--num-gpus": ("num_gpus", int, "GPUs in the job (default: the preset's one node)"),
    "--gpus-per-node": ("gpus_per_node", int, "GPUs per node (TP groups should stay inside one)"),
    "--gpu-memory-gib": ("gpu_memory_gib", float, "memory per GPU in GiB"),
    "--gpu-peak-tflops": ("gpu_peak_tflops", float, "dense bf16 peak per GPU in TFLOP/s"),
    "--intra-node-gbps": ("intra_node_gbps", float, "achievable bus bandwidth inside a node, GB/s per GPU"),
    "--inter-node-gbps": ("inter_node_gbps", float, "achievable bus bandwidth across nodes, GB/s per GPU"),
    "--achievable-mfu": ("achievable_mfu", float, "fraction of peak the GEMMs reach (0-1)"),
    "--memory-gbps": ("memory_gbps", float, "device memory bandwidth, GB/s"),
    "--latency-us": ("latency_us", float, "time per collective call or p2p message, microseconds"),
    "--elementwise-gbps": ("elementwise_gbps", float, "rate of elementwise kernels, GB/s (default: --memory-gbps)"),
    "--attention-tflops": ("attention_tflops", float, "rate of the attention core, TFLOP/s (default: the GEMM rate)"),
}
OPTIONAL = ("--memory-gbps", "--latency-us", "--elementwise-gbps", "--attention-tflops")   # defaults exist


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    """The cluster description flags (`--cluster` preset, then per-field overrides)."""
    group = parser.add_argument_group("cluster")
    group.add_argument("--cluster", choices=sorted(PRESETS) + [MEASURED],
                       help="preset machine (numbers in megagpt/plan/cluster.py with sources); cpu-here measures "
                            "this machine")
    for flag, (dest, kind, help_text) in FLAGS.items():
        group.add_argument(flag, dest=f"cluster.{dest}", type=kind, default=None, help=help_text)


def cluster_problems(c: Cluster) -> list[str]:
    """What makes a cluster description unusable, one sentence each."""
    problems = [f"{flag} must be > 0, got {getattr(c, dest)}" for flag, (dest, _, _) in FLAGS.items()
                if getattr(c, dest) is not None and not getattr(c, dest) > 0]
    if not problems and c.achievable_mfu > 1:
        problems.append(f"--achievable-mfu is a fraction of peak and must be <= 1, got {c.achievable_mfu}")
    if not problems and c.num_gpus > c.gpus_per_node and c.num_gpus % c.gpus_per_node:
        problems.append(f"--num-gpus {c.num_gpus} is not a whole number of nodes of --gpus-per-node "
                        f"{c.gpus_per_node}")
    return problems


def cluster_from_args(ns: argparse.Namespace, measured: Optional[Cluster] = None) -> Cluster:
    """The preset named by --cluster (or `measured` for cpu-here), with every explicit flag applied on top.

    Without a preset every numeric flag must be given; raises ValueError with one sentence naming what is missing.
    """
    base = measured if ns.cluster == MEASURED else PRESETS.get(ns.cluster) if ns.cluster else None
    given = {dest: getattr(ns, f"cluster.{dest}") for dest, _, _ in FLAGS.values()
             if getattr(ns, f"cluster.{dest}", None) is not None}
    if base is None:
        missing = [flag for flag, (dest, _, _) in FLAGS.items() if dest not in given and flag not in OPTIONAL]
        if missing:
            raise ValueError(f"no cluster described: pass --cluster ({', '.join(sorted(PRESETS) + [MEASURED])}) or "
                             f"all of {', '.join(missing)}")
        base = Cluster(**{k: v for k, v in given.items()})
    cluster = dataclasses.replace(base, **given)
    if "num_gpus" in given and "gpus_per_node" not in given and cluster.num_gpus < cluster.gpus_per_node:
        cluster = dataclasses.replace(cluster, gpus_per_node=cluster.num_gpus)
    problems = cluster_problems(cluster)
    if problems:
        raise ValueError("; ".join(problems))
    return cluster
