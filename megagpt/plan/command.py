"""`tools/plan.py`: the training flags (megagpt.cli, unchanged) plus a cluster description, to a plan.

Why the training parser itself: a plan is only useful for the command line that will run, so every training flag
(presets, Megatron names, aliases) parses exactly as pretrain_gpt.py parses it. Layout flags given on the command
line stay fixed in the search; the others are searched.
"""
from __future__ import annotations

import argparse
import json
from typing import Callable, Optional, Sequence

from megagpt.cli import build_parser, parse_args
from megagpt.config import ConfigError
from megagpt.plan.cluster import MEASURED, Cluster, add_cluster_flags, cluster_from_args
from megagpt.plan.report import dry_run
from megagpt.plan.search import (OPEN_FIELDS, PlanError, describe, format_table, launch_commands, planning_copy,
                                 search)

_LAYOUT_DESTS = {f"{section}.{name}": name for section in ("parallel", "train", "model") for name in OPEN_FIELDS}


def _plan_flags(parser: argparse.ArgumentParser) -> None:
    add_cluster_flags(parser)
    group = parser.add_argument_group("plan output")
    group.add_argument("--json", action="store_true", help="print the ranked layouts as JSON (best first)")
    group.add_argument("--explain", action="store_true",
                       help="term-by-term memory and step time of one layout (the given one, else the best)")
    group.add_argument("--top", type=int, default=10, help="layouts to list")


def full_parser() -> argparse.ArgumentParser:
    """Training flags and plan flags together (for --help)."""
    parser = build_parser()
    parser.description = "megagpt plan: memory and step time per layout, and the best layout for a cluster"
    _plan_flags(parser)
    return parser


def run(argv: Optional[Sequence[str]], measure: Optional[Callable[[int], Cluster]] = None) -> tuple[str, int]:
    """(text to print, exit status) for a plan command line. `measure(num_gpus)` measures this machine for
    --cluster cpu-here (the caller supplies it: measuring needs torch processes, which plan/ does not run)."""
    own = argparse.ArgumentParser(add_help=False)
    _plan_flags(own)
    ns, training_argv = own.parse_known_args(argv)
    if "-h" in training_argv or "--help" in training_argv:
        return full_parser().format_help(), 0
    try:
        measured = None
        if ns.cluster == MEASURED:
            if measure is None:
                raise ValueError("--cluster cpu-here needs a measurement of this machine (run tools/plan.py)")
            measured = measure(getattr(ns, "cluster.num_gpus", None) or 2)
        cluster = cluster_from_args(ns, measured)
        config = parse_args(training_argv)
        given = vars(build_parser().parse_args(training_argv))
        fixed = {name for dest, name in _LAYOUT_DESTS.items() if given.get(dest) is not None}
        if given.get("recompute_activations"):
            fixed.add("recompute_granularity")
        if ns.explain and fixed >= {"tensor_model_parallel_size", "pipeline_model_parallel_size"}:
            config = planning_copy(config)
            from megagpt.config import validate
            validate(config, cluster.num_gpus)
            return dry_run(config, cluster.num_gpus, cluster), 0
        best = search(config, cluster, fixed, top=ns.top)
    except (ValueError, ConfigError) as exc:       # PlanError is a ValueError
        return f"plan: error: {exc}", 2
    if ns.json:
        return json.dumps([c.to_json() for c in best], indent=2), 0
    if ns.explain:
        return dry_run(best[0].config, cluster.num_gpus, cluster), 0
    text = [f"cluster {cluster.name}: {cluster.num_gpus} GPUs ({cluster.num_nodes} nodes x {cluster.gpus_per_node}), "
            f"{cluster.gpu_memory_gib:g} GiB each; fixed: {', '.join(sorted(fixed)) or 'nothing'}",
            format_table(best), "", f"best: {describe(best[0].config, cluster.num_gpus)}",
            launch_commands(best[0].config, cluster, _without_layout_flags(training_argv))]
    return "\n".join(text), 0


def _without_layout_flags(argv: Sequence[str]) -> list[str]:
    """The user's training flags minus the ones the plan sets (they are appended with the chosen values)."""
    drop = {"--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--micro-batch-size",
            "--num-layers-per-virtual-pipeline-stage", "--recompute-granularity"}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in drop:
            skip = True
            continue
        if a.split("=", 1)[0] in drop or a == "--recompute-activations":
            continue
        out.append(a)
    return out
