"""Batch size and run length as arithmetic on the config: the global batch of each step (constant or ramping up),
iterations from samples, the LR schedule's lengths in samples, model chunks per pipeline rank."""
from __future__ import annotations

from typing import Optional

from megagpt.config.fields import (Config)

__all__ = ["final_global_batch_size", "stage_of", "step_schedule", "step_schedule_problems", "virtual_stage", "global_batch_size_at", "num_microbatches", "num_model_chunks", "pipeline_schedule_problems", "resolved_pipeline_schedule", "run_length_problems", "schedule_steps", "train_iters", "train_samples", "v_shaped"]


_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def _count(text: str) -> int:
    """'250B' -> 250_000_000_000 (Megatron's K/M/B/T suffixes; a decimal mantissa is allowed)."""
    text = text.strip().upper()
    scale = _SUFFIXES.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def step_schedule(config: Config) -> list[tuple[int, int]]:
    """--step-batch-size-schedule as [(first sample, global batch size)], thresholds given in tokens and turned into
    samples (// seq-length), as Megatron does; ValueError naming the entry when one cannot be read."""
    entries = []
    for entry in config.train.step_batch_size_schedule.replace(",", " ").split():
        tokens, sep, size = entry.partition(":")
        try:
            entries.append((_count(tokens) // config.model.seq_length, _count(size)))
        except ValueError:
            raise ValueError(f"--step-batch-size-schedule entry {entry!r} is not TOKENS:SIZE") from None
        if not sep:
            raise ValueError(f"--step-batch-size-schedule entry {entry!r} is not TOKENS:SIZE")
    return entries


def final_global_batch_size(config: Config, dp_size: int) -> int:
    """--global-batch-size (the last size of --step-batch-size-schedule), or Megatron's default micro-batch-size x
    DP (one micro-batch per step)."""
    t = config.train
    if t.step_batch_size_schedule:
        return step_schedule(config)[-1][1]
    return t.global_batch_size if t.global_batch_size is not None else t.micro_batch_size * dp_size


def global_batch_size_at(config: Config, dp_size: int, consumed_samples: int) -> int:
    """The global batch size of the step that starts after `consumed_samples`: the step schedule's entry, or
    Megatron's ramp-up (from START, +INCREMENT every SAMPLES / ((final - START) / INCREMENT) samples, the final size
    once SAMPLES are passed)."""
    if config.train.step_batch_size_schedule:
        return [size for first, size in step_schedule(config) if consumed_samples >= first][-1]
    final = final_global_batch_size(config, dp_size)
    if not config.train.rampup_batch_size:
        return final
    start, increment, ramp_samples = config.train.rampup_batch_size
    if consumed_samples > ramp_samples or final == start:
        return final
    per_increment = ramp_samples / ((final - start) // increment)
    return start + int(consumed_samples / per_increment) * increment


def num_microbatches(config: Config, dp_size: int, consumed_samples: Optional[int] = None) -> int:
    """Micro-batches per DP rank of a step (of the final global batch size when `consumed_samples` is None)."""
    size = final_global_batch_size(config, dp_size) if consumed_samples is None else \
        global_batch_size_at(config, dp_size, consumed_samples)
    return size // (config.train.micro_batch_size * dp_size)


def train_iters(config: Config, dp_size: int) -> int:
    """--train-iters, or the iterations --train-samples take (with ramp-up: walked step by step, as Megatron does;
    a last partial batch is dropped)."""
    t = config.train
    if t.train_iters is not None:
        return t.train_iters
    iterations = consumed = 0
    if t.step_batch_size_schedule:     # Megatron's walk: the last step may end past --train-samples
        while consumed < t.train_samples:
            consumed += global_batch_size_at(config, dp_size, consumed)
            iterations += 1
        return iterations
    ramp_end = t.rampup_batch_size[2] if t.rampup_batch_size else -1
    while consumed <= ramp_end and consumed <= t.train_samples:
        consumed += global_batch_size_at(config, dp_size, consumed)
        iterations += 1
    return iterations + max(t.train_samples - consumed, 0) // final_global_batch_size(config, dp_size)


def train_samples(config: Config, dp_size: int) -> int:
    """Samples the run consumes: its steps' global batch sizes added up."""
    consumed = 0
    for _ in range(train_iters(config, dp_size)):
        consumed += global_batch_size_at(config, dp_size, consumed)
    return consumed


def schedule_steps(config: Config, dp_size: int) -> dict:
    """Warmup, decay, WSD-decay and weight-decay-increment lengths in samples (Megatron's
    get_optimizer_param_scheduler: iteration flags are multiplied by the final global batch size)."""
    o, t = config.optim, config.train
    gbs = final_global_batch_size(config, dp_size)
    if t.train_samples is None:
        decay = (o.lr_decay_iters or t.train_iters) * gbs
        warmup = o.lr_warmup_iters * gbs
        wsd = o.lr_wsd_decay_iters * gbs if o.lr_wsd_decay_iters is not None else None
        wd_incr = t.train_iters * gbs
    else:
        decay, warmup, wsd, wd_incr = (o.lr_decay_samples or t.train_samples, o.lr_warmup_samples,
                                       o.lr_wsd_decay_samples, t.train_samples)
    if o.lr_warmup_fraction is not None:
        warmup = o.lr_warmup_fraction * decay
    return {"warmup": warmup, "decay": decay, "wsd_decay": wsd, "wd_incr": wd_incr}


def run_length_problems(config: Config, dp_size: int) -> list[str]:
    """Iteration- and sample-based flags mixed, ramp-ups that cannot be split into micro-batches, and the like."""
    t, o = config.train, config.optim
    problems = []
    if (t.train_iters is None) == (t.train_samples is None):
        return ["give exactly one of --train-iters and --train-samples"]
    if t.train_iters is not None:
        mixed = [f for f, v in (("--lr-decay-samples", o.lr_decay_samples), ("--lr-warmup-samples", o.lr_warmup_samples),
                                ("--lr-wsd-decay-samples", o.lr_wsd_decay_samples)) if v]
        problems += [f"{flag} needs --train-samples, not --train-iters" for flag in mixed]
    else:
        problems += [f"{flag} needs --train-iters, not --train-samples" for flag, v in
                     (("--lr-decay-iters", o.lr_decay_iters), ("--lr-warmup-iters", o.lr_warmup_iters),
                      ("--lr-wsd-decay-iters", o.lr_wsd_decay_iters)) if v]
    if o.lr_warmup_fraction is not None and (o.lr_warmup_iters or o.lr_warmup_samples):
        problems.append("give only one of --lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples")
    if o.lr_decay_style == "WSD" and o.lr_wsd_decay_iters is None and o.lr_wsd_decay_samples is None:
        problems.append("--lr-decay-style WSD needs --lr-wsd-decay-iters or --lr-wsd-decay-samples")
    incr = o.weight_decay_incr_style != "constant"
    if incr != (o.start_weight_decay is not None and o.end_weight_decay is not None):
        problems.append("--start-weight-decay and --end-weight-decay go together with a non-constant "
                        "--weight-decay-incr-style" if incr else
                        "--start/--end-weight-decay need --weight-decay-incr-style linear or cosine")
    return problems + _rampup_problems(config, dp_size)


def step_schedule_problems(config: Config, dp_size: int) -> list[str]:
    """What is wrong with --step-batch-size-schedule (checked first: every batch size comes from it)."""
    t = config.train
    if not t.step_batch_size_schedule:
        return []
    others = [f for f, v in (("--global-batch-size", t.global_batch_size), ("--rampup-batch-size",
                                                                           t.rampup_batch_size)) if v]
    if others:
        return [f"--step-batch-size-schedule sets the global batch size: drop {' and '.join(others)}"]
    try:
        entries = step_schedule(config)
    except ValueError as exc:
        return [str(exc)]
    firsts, sizes = [f for f, _ in entries], [s for _, s in entries]
    step = t.micro_batch_size * dp_size
    if not entries or firsts[0] != 0 or any(b <= a for a, b in zip(firsts, firsts[1:])) or min(sizes) < 1:
        return [f"--step-batch-size-schedule {t.step_batch_size_schedule!r}: the first entry must start at 0 tokens, "
                f"the thresholds must grow (in samples of {config.model.seq_length} tokens: {firsts}) and every size "
                f"be >= 1"]
    bad = [s for s in sizes if s % step]
    if bad:   # Megatron finds this only when the step is reached; here before start-up
        return [f"--step-batch-size-schedule: global batch sizes {bad} are not multiples of micro-batch-size "
                f"{t.micro_batch_size} x data-parallel size {dp_size}"]
    return []


def _rampup_problems(config: Config, dp_size: int) -> list[str]:
    if not config.train.rampup_batch_size:
        return []
    start, increment, samples = config.train.rampup_batch_size
    final, step = final_global_batch_size(config, dp_size), config.train.micro_batch_size * dp_size
    if start < 1 or increment < 1 or samples < 0 or final < start or (final - start) % increment:
        return [f"--rampup-batch-size {start} {increment} {samples}: need START >= 1, INCREMENT >= 1, SAMPLES >= 0 "
                f"and global-batch-size {final} - START a multiple of INCREMENT"]
    bad = [size for size in range(start, final + 1, increment) if size % step]
    if bad:
        return [f"--rampup-batch-size {start} {increment} {samples}: global batch sizes {bad[:4]} of the ramp are not "
                f"multiples of micro-batch-size {config.train.micro_batch_size} x data-parallel size {dp_size}"]
    return []


def num_model_chunks(config: Config) -> int:
    """Model chunks per pipeline rank: 1, or layers / (PP x layers per virtual stage) for interleaving."""
    p = config.parallel
    if v_shaped(p.pipeline_schedule):
        return 2
    if not p.num_layers_per_virtual_pipeline_stage:
        return 1
    return max(config.model.num_layers // (p.pipeline_model_parallel_size * p.num_layers_per_virtual_pipeline_stage),
               1)


# ------------------------------------------------------------------------------------------ pipeline schedule

def resolved_pipeline_schedule(config: Config) -> str:
    """The schedule a run uses: --pipeline-schedule, else interleaved with virtual stages, else 1f1b."""
    p = config.parallel
    if p.pipeline_schedule is not None:
        return p.pipeline_schedule
    return "interleaved" if p.num_layers_per_virtual_pipeline_stage else "1f1b"


def v_shaped(schedule: Optional[str]) -> bool:
    """ZB-V places a rank's two chunks in a V (chunk 0 on virtual stage pp_rank, chunk 1 on 2 PP - 1 - pp_rank);
    every other schedule interleaves (chunk c on virtual stage c PP + pp_rank)."""
    return schedule == "zb-v"


def pipeline_schedule_problems(config: Config) -> list[str]:
    """What --pipeline-schedule cannot run with (the virtual-stage rules of interleaving are layout_problems')."""
    p, m = config.parallel, config.model
    schedule, pp, vl = p.pipeline_schedule, p.pipeline_model_parallel_size, p.num_layers_per_virtual_pipeline_stage
    if schedule is None:
        return []
    if schedule == "interleaved" and vl is None:
        return ["--pipeline-schedule interleaved needs --num-layers-per-virtual-pipeline-stage"]
    if schedule in ("1f1b", "zb-h1") and vl is not None:
        return [f"--pipeline-schedule {schedule} runs one model chunk per rank: drop "
                f"--num-layers-per-virtual-pipeline-stage ({vl}) or use interleaved"]
    if schedule == "zb-v":
        if vl is not None:
            return [f"--pipeline-schedule zb-v places two chunks per rank itself: drop "
                    f"--num-layers-per-virtual-pipeline-stage ({vl})"]
        if pp < 2:
            return [f"--pipeline-schedule zb-v needs pipeline-model-parallel-size >= 2, got {pp}"]
        if m.num_layers % (2 * pp) != 0:
            return [f"--pipeline-schedule zb-v needs num-layers {m.num_layers} divisible by 2 x "
                    f"pipeline-model-parallel-size {pp} = {2 * pp} (two chunks per rank)"]
    return []


def virtual_stage(pp_size: int, pp_rank: int, chunk: int, num_chunks: int = 1, v_shape: bool = False) -> int:
    """Position of model chunk `chunk` of pipeline rank `pp_rank` among the PP x chunks virtual stages.

    Interleaved (Megatron): chunk c of rank r is virtual stage c PP + r, so activations always move to the next rank.
    V shape (ZB-V, two chunks): chunk 0 goes down the ranks, chunk 1 comes back up (virtual stage 2 PP - 1 - r), so
    the last rank passes activations to itself at the turn and rank 0 holds both the first and the last stage.
    The single rule of which layers and which messages a (rank, chunk) owns; `stage_of` is its inverse."""
    if v_shape:
        if num_chunks != 2:
            raise ValueError(f"the V placement (zb-v) has exactly 2 model chunks per rank, got {num_chunks}")
        return pp_rank if chunk == 0 else 2 * pp_size - 1 - pp_rank
    return chunk * pp_size + pp_rank


def stage_of(vs: int, pp_size: int, num_chunks: int = 1, v_shape: bool = False) -> tuple[int, int]:
    """(pp_rank, chunk) holding virtual stage `vs`: the inverse of `virtual_stage`."""
    if not 0 <= vs < pp_size * num_chunks:
        raise ValueError(f"virtual stage {vs} outside {pp_size} ranks x {num_chunks} chunks")
    if v_shape:
        return (vs, 0) if vs < pp_size else (2 * pp_size - 1 - vs, 1)
    return vs % pp_size, vs // pp_size
