"""Layout search: every valid TP x PP x DP x micro-batch x virtual-stage x recompute layout, the ones that fit,
ranked by predicted step time.

Why validity comes from config.validate: a layout the planner recommends must be one the trainer accepts, so the
rules are the trainer's own (imported, never restated). Dimensions the user fixed on the command line stay fixed.
"""
from __future__ import annotations

import copy
import shlex
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from megagpt.config import Config, ConfigError, final_global_batch_size, num_model_chunks, validate
from megagpt.plan.cluster import GIB, Cluster
from megagpt.plan.memory import StageMemory, all_stages, stage_memory
from megagpt.plan.step_time import StepTime, step_time

OPEN_FIELDS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
               "num_layers_per_virtual_pipeline_stage", "recompute_granularity")
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
CHUNKS = (2, 4)


class PlanError(ValueError):
    """A model or cluster for which no layout can be proposed; the message is one sentence saying why."""


@dataclass
class Candidate:
    """One layout with its predicted memory (max over stages) and step time."""

    config: Config
    world_size: int
    max_memory: int
    time: StepTime
    stages: Optional[list[StageMemory]] = None

    @property
    def sizes(self) -> tuple[int, int, int]:
        p = self.config.parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        return tp, pp, self.world_size // (tp * pp)

    def to_json(self) -> dict:
        tp, pp, dp = self.sizes
        p, m = self.config.parallel, self.config.model
        stages = self.stages or []
        return {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "data_parallel_size": dp,
                "virtual_pipeline_chunks": num_model_chunks(self.config),
                "num_layers_per_virtual_pipeline_stage": p.num_layers_per_virtual_pipeline_stage,
                "micro_batch_size": self.config.train.micro_batch_size, "recompute": m.recompute_granularity,
                "sequence_parallel": p.sequence_parallel,
                "zero_stage": p.zero_stage if p.use_distributed_optimizer else 0,
                "memory_gib": [round(s.gib, 3) for s in stages], "max_memory_gib": round(self.max_memory / GIB, 3),
                "step_time_s": round(self.time.total, 6), "tflops_per_gpu": round(self.time.tflops_per_gpu, 2),
                "tokens_per_s": round(self.time.tokens_per_s, 1)}


def with_layout(config: Config, **fields) -> Config:
    """A copy of `config` with layout fields set (field names of any section)."""
    out = copy.deepcopy(config)
    for key, value in fields.items():
        section = next(s for s in (out.parallel, out.train, out.model) if hasattr(s, key))
        setattr(section, key, value)
    return out


def planning_copy(config: Config) -> Config:
    """A copy the planner can validate: planning one step needs no data files and no run length."""
    out = with_layout(config)
    out.data.mock_data = True
    if out.train.train_iters is None and out.train.train_samples is None:
        out.train.train_iters = 1
    return out


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def enumerate_layouts(config: Config, world_size: int, cluster: Cluster,
                      fixed: Iterable[str] = ()) -> tuple[list[Config], Counter]:
    """Configs for every combination of the open fields that config.validate accepts, and a count of the
    problems of those it rejected (for the one-sentence error when none is valid). TP stays inside a node."""
    fixed = set(fixed)
    m, p, t = config.model, config.parallel, config.train
    tps = [p.tensor_model_parallel_size] if "tensor_model_parallel_size" in fixed else \
        [k for k in _divisors(world_size) if k <= cluster.gpus_per_node]
    rejected: Counter = Counter()
    out = []
    for tp in tps:
        pps = [p.pipeline_model_parallel_size] if "pipeline_model_parallel_size" in fixed else \
            _divisors(world_size // tp) if world_size % tp == 0 else [1]
        for pp in pps:
            dp = max(world_size // (tp * pp), 1)
            mbs = [t.micro_batch_size] if "micro_batch_size" in fixed else \
                [b for b in MICRO_BATCHES if final_global_batch_size(config, dp) % (b * dp) == 0] or [t.micro_batch_size]
            vls: list = [p.num_layers_per_virtual_pipeline_stage] \
                if "num_layers_per_virtual_pipeline_stage" in fixed else \
                [None] + [m.num_layers // (pp * v) for v in CHUNKS if pp > 1 and m.num_layers % (pp * v) == 0]
            recomputes = [m.recompute_granularity] if "recompute_granularity" in fixed else [None, "selective", "full"]
            for mb in mbs:
                for vl in vls:
                    for rc in recomputes:
                        candidate = with_layout(config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                micro_batch_size=mb, num_layers_per_virtual_pipeline_stage=vl,
                                                recompute_granularity=rc)
                        try:
                            validate(candidate, world_size)
                        except ConfigError as exc:
                            rejected.update(line.strip(" -") for line in str(exc).splitlines()[1:])
                            continue
                        out.append(candidate)
    return out, rejected


def max_stage_memory(config: Config, world_size: int, cluster: Cluster) -> int:
    """The largest stage: the first (most micro-batches in flight, embedding) or the last (LM head, loss)."""
    pp = config.parallel.pipeline_model_parallel_size
    return max(stage_memory(config, world_size, r, cluster).total for r in {0, pp - 1})


def search(config: Config, cluster: Cluster, fixed: Iterable[str] = (), top: int = 10) -> list[Candidate]:
    """The `top` fitting layouts, fastest first (every stage's memory filled in); PlanError when none fits."""
    world = cluster.num_gpus
    planning = planning_copy(config)
    configs, rejected = enumerate_layouts(planning, world, cluster, fixed)
    if not configs:
        reason = rejected.most_common(1)[0][0] if rejected else "no combination to try"
        raise PlanError(f"no valid layout for {world} GPUs: {reason}")
    limit = int(cluster.gpu_memory_gib * GIB)
    fitting, smallest = [], None
    for c in configs:
        mem = max_stage_memory(c, world, cluster)
        if smallest is None or mem < smallest[0]:
            smallest = (mem, c)
        if mem <= limit:
            fitting.append(Candidate(c, world, mem, step_time(c, world, cluster)))
    if not fitting:
        mem, c = smallest
        raise PlanError(f"the model fits nowhere on {world} GPUs of {cluster.gpu_memory_gib:g} GiB: the smallest "
                        f"layout ({describe(c, world)}) needs {mem / GIB:.1f} GiB per GPU")
    fitting.sort(key=lambda cand: (float(f"{cand.time.total:.3g}"), cand.max_memory))   # ties: less memory
    best = fitting[:top]
    for cand in best:
        cand.stages = all_stages(cand.config, world, cluster)
    return best


def describe(config: Config, world_size: int) -> str:
    """`TP 2 x PP 4 x DP 8, micro-batch 2, 2 chunks, recompute selective, SP, ZeRO-1` in one line."""
    p, m = config.parallel, config.model
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    parts = [f"TP {tp} x PP {pp} x DP {world_size // (tp * pp)}", f"micro-batch {config.train.micro_batch_size}"]
    if num_model_chunks(config) > 1:
        parts.append(f"{num_model_chunks(config)} chunks")
    parts.append(f"recompute {m.recompute_granularity or 'none'}")
    if p.sequence_parallel:
        parts.append("SP")
    if p.use_distributed_optimizer:
        parts.append(f"ZeRO-{p.zero_stage}")
    return ", ".join(parts)


def format_table(candidates: Sequence[Candidate]) -> str:
    """The ranked layouts as a fixed-width table."""
    headers = ["#", "TP", "PP", "DP", "mb", "chunks", "recompute", "max GiB", "GiB per stage", "step s",
               "TFLOP/s/GPU", "tokens/s"]
    rows = []
    for i, c in enumerate(candidates, 1):
        tp, pp, dp = c.sizes
        per_stage = [s.gib for s in c.stages or []]
        stage_text = " ".join(f"{g:.1f}" for g in per_stage[:4]) + (" ..." if len(per_stage) > 4 else "")
        rows.append([i, tp, pp, dp, c.config.train.micro_batch_size, num_model_chunks(c.config),
                     c.config.model.recompute_granularity or "-", f"{c.max_memory / GIB:.1f}", stage_text,
                     f"{c.time.total:.3f}", f"{c.time.tflops_per_gpu:.1f}", f"{c.time.tokens_per_s:,.0f}"])
    cells = [headers] + [[str(x) for x in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in cells)


def layout_flags(config: Config) -> list[str]:
    """The training flags that select a layout, in Megatron's names."""
    p, m = config.parallel, config.model
    flags = ["--tensor-model-parallel-size", str(p.tensor_model_parallel_size),
             "--pipeline-model-parallel-size", str(p.pipeline_model_parallel_size),
             "--micro-batch-size", str(config.train.micro_batch_size)]
    if p.num_layers_per_virtual_pipeline_stage:
        flags += ["--num-layers-per-virtual-pipeline-stage", str(p.num_layers_per_virtual_pipeline_stage)]
    if m.recompute_granularity:
        flags += ["--recompute-granularity", m.recompute_granularity]
    return flags


def launch_commands(config: Config, cluster: Cluster, training_argv: Sequence[str]) -> str:
    """A torchrun line (one node, or per node with a c10d rendezvous) and an sbatch line for the layout."""
    args = " ".join(shlex.quote(a) for a in list(training_argv) + layout_flags(config))
    nodes, per_node = cluster.num_nodes, min(cluster.gpus_per_node, cluster.num_gpus)
    rdzv = "" if nodes == 1 else " --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:29500"
    torchrun = f"torchrun --nnodes {nodes} --nproc-per-node {per_node}{rdzv} examples/pretrain_gpt.py {args}"
    sbatch = (f"sbatch --nodes {nodes} --ntasks-per-node {per_node} --gpus-per-node {per_node} "
              f"--wrap \"srun python examples/pretrain_gpt.py {args}\"")
    return f"{torchrun}\n{sbatch}"
