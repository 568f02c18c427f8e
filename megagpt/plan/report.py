"""What the trainer and tools/plan.py print: the start-up memory line, the --dry-run plan, the --explain breakdown.

Why strings from the library: the trainer (rank 0 at start-up, or --dry-run before any allocation) and the CLI
print the same plan, so both call these and neither formats numbers of its own.
"""
from __future__ import annotations

from typing import Optional

from megagpt.config import Config, num_microbatches
from megagpt.plan.cluster import GIB, Cluster
from megagpt.plan.memory import all_stages, chunk_activation_bytes, dims, layer_activation_terms, rank_chunks
from megagpt.plan.search import describe
from megagpt.plan.step_time import step_time

MIB = 2 ** 20


def startup_report(config: Config, world_size: int, cluster: Optional[Cluster] = None) -> str:
    """One line for rank 0 at start-up: the layout and the predicted peak memory of every pipeline stage."""
    stages = all_stages(config, world_size, cluster)
    per_stage = " | ".join(f"stage {s.pp_rank} {s.gib:.2f} GiB ({s.in_flight} in flight)" for s in stages)
    return f" > plan: {describe(config, world_size)}: predicted peak memory per rank: {per_stage}"


def activation_check(config: Config, world_size: int, pp_rank: int, device: str, measured: dict[int, int]) -> str:
    """The trainer's check of the plan on a real micro-batch: the bytes saved for backward by each model chunk's
    first micro-batch forward of iteration 1 (`measured`, by chunk), summed over this rank's chunks, beside the
    plan's chunk_activation_bytes for the same chunks. A gap here means the memory plan misses a term."""
    d = dims(config, world_size, device)
    plan = sum(sum(chunk_activation_bytes(config, d, *chunk).values()) for chunk in rank_chunks(config, pp_rank))
    return (f"activations per micro-batch: measured {sum(measured.values()) / MIB:.2f} MiB, "
            f"plan {plan / MIB:.2f} MiB")


def explain(config: Config, world_size: int, cluster: Optional[Cluster] = None) -> str:
    """Every memory term of every stage, the per-layer activation terms, and (with a cluster) every step-time term."""
    device = cluster.device if cluster is not None else "cuda"
    lines = [f"layout: {describe(config, world_size)}; {num_microbatches(config, dims(config, world_size).dp)} "
             f"micro-batches per step; memory on {device}"]
    lines.append("activations saved per layer per micro-batch (Korthikanti et al. 2022 terms, megagpt's kernels):")
    for name, value in layer_activation_terms(config, dims(config, world_size, device)).items():
        lines.append(f"  {name:<44s} {value / MIB:12.2f} MiB")
    for s in all_stages(config, world_size, cluster):
        lines.append(f"stage {s.pp_rank}: {s.gib:.2f} GiB")
        for name, value in s.terms.items():
            lines.append(f"  {name:<52s} {value / MIB:12.1f} MiB")
    if cluster is not None:
        t = step_time(config, world_size, cluster)
        lines.append(f"step time on {cluster.name} ({cluster.num_gpus} GPUs): {t.total:.4f} s, "
                     f"{t.tflops_per_gpu:.1f} TFLOP/s per GPU, {t.tokens_per_s:,.0f} tokens/s")
        for name, value in t.terms.items():
            lines.append(f"  {name:<44s} {value * 1e3:12.2f} ms")
        limit = cluster.gpu_memory_gib
        worst = max(s.gib for s in all_stages(config, world_size, cluster))
        lines.append(f"fits: {'yes' if worst <= limit else 'NO'} ({worst:.2f} of {limit:g} GiB per GPU)")
    return "\n".join(lines)


def dry_run(config: Config, world_size: int, cluster: Optional[Cluster] = None) -> str:
    """The plan `--dry-run` prints before exiting: the start-up line and the term-by-term breakdown. Pure
    arithmetic: nothing is allocated, so it runs for any model size on any machine."""
    return startup_report(config, world_size, cluster) + "\n" + explain(config, world_size, cluster)


def gib(nbytes: int) -> float:
    return nbytes / GIB
