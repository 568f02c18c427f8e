"""Every arithmetic rule a configuration must satisfy, each in one place, and `validate` that applies them all,
naming the offending numbers before any allocation. The layout rules (`layout_problems`) and schedule rules
(`schedule_problems`) are imported by the process-group builder, the pipeline schedules, checkpoint conversion and the
planner. Checks that touch files or optional backends are training.setup's."""
from __future__ import annotations

import os
from typing import Optional

from megagpt.config.fields import (Config, ConfigError, DECAY_STYLES, DataConfig, DiagnosticsConfig, LoggingConfig, ModelConfig, OptimConfig, TrainConfig)
from megagpt.config.run_length import (final_global_batch_size, num_microbatches, num_model_chunks, pipeline_schedule_problems,
                                       run_length_problems, schedule_steps, step_schedule_problems)

__all__ = ["all_data_prefixes", "data_prefixes", "data_problems", "diagnostics_problems", "layout_problems", "logging_problems", "non_persistent_dir", "optimizer_problems", "raise_if", "schedule_problems", "validate", "variant_problems"]


def layout_problems(tp: int, pp: int, *, world_size: Optional[int] = None, num_attention_heads: Optional[int] = None,
                    num_layers: Optional[int] = None, ffn_size: Optional[int] = None, virtual_chunks: int = 1,
                    num_microbatches: Optional[int] = None, what: str = "") -> list[str]:
    """Every rule a TP x PP (x virtual chunks) layout must satisfy, for the sizes given (None: not checked).

    `what` prefixes the parallel-size names ("target " for conversions)."""
    tp_name, pp_name = f"{what}tensor-model-parallel-size", f"{what}pipeline-model-parallel-size"
    sizes = [("world size", world_size), (tp_name, tp), (pp_name, pp), ("virtual pipeline chunks", virtual_chunks)]
    problems = [f"{name} must be >= 1, got {value}" for name, value in sizes if value is not None and value < 1]
    if problems:
        return problems
    if world_size is not None and world_size % (tp * pp) != 0:
        problems.append(f"world size {world_size} is not divisible by {tp_name} {tp} x {pp_name} {pp} = {tp * pp}")
    if num_attention_heads is not None and num_attention_heads % tp != 0:
        problems.append(f"num-attention-heads {num_attention_heads} is not divisible by {tp_name} {tp}")
    if ffn_size is not None and ffn_size % tp != 0:
        problems.append(f"ffn-hidden-size {ffn_size} is not divisible by {tp_name} {tp}")
    if num_layers is not None and num_layers % (pp * virtual_chunks) != 0:
        problems.append(f"num-layers {num_layers} is not divisible by {pp_name} {pp}"
                        + (f" x virtual pipeline chunks {virtual_chunks}" if virtual_chunks > 1 else ""))
    if virtual_chunks > 1 and pp < 2:
        problems.append(f"interleaving ({virtual_chunks} model chunks per rank) needs {pp_name} > 1, got {pp}")
    elif virtual_chunks > 1 and num_microbatches is not None and num_microbatches % pp != 0:
        problems.append(f"interleaved schedule needs micro-batches per step ({num_microbatches}) to be a multiple "
                        f"of {pp_name} {pp}")
    return problems


def schedule_problems(max_lr: float, min_lr: float, warmup_steps: float, decay_steps: Optional[float],
                      decay_style: str) -> list[str]:
    """What makes a learning-rate schedule invalid (empty when it is valid); lengths in samples, as
    `schedule_steps` resolves them from --lr-warmup-*/--lr-decay-* and --train-iters/--train-samples."""
    problems = []
    if decay_style not in DECAY_STYLES:
        problems.append(f"--lr-decay-style must be one of {DECAY_STYLES}, got {decay_style!r}")
    if not 0.0 <= min_lr <= max_lr:
        problems.append(f"need 0 <= --min-lr ({min_lr}) <= --lr ({max_lr})")
    if warmup_steps < 0:
        problems.append(f"the warmup must not be negative, got {warmup_steps} samples")
    if decay_style != "constant":
        if decay_steps is None:
            problems.append(f"--lr-decay-style {decay_style} needs a decay length (--lr-decay-iters/--train-iters "
                            f"or --lr-decay-samples/--train-samples)")
        elif decay_steps <= warmup_steps:
            problems.append(f"the decay ({decay_steps:g} samples: --lr-decay-iters or --train-iters x global batch, "
                            f"or --lr-decay-samples) must outlast the warmup ({warmup_steps:g} samples)")
    return problems


def optimizer_problems(o: OptimConfig) -> list[str]:
    """Optimizer and precision settings that cannot run together."""
    problems = []
    if o.bf16 and o.fp16:
        problems.append("--bf16 and --fp16 are mutually exclusive")
    if o.optimizer not in ("adam", "sgd"):
        problems.append(f"--optimizer must be adam or sgd, got {o.optimizer!r}")
    if o.clip_grad < 0:
        problems.append(f"--clip-grad must be >= 0, got {o.clip_grad}")
    return problems


def validate(config: Config, world_size: int) -> None:
    """Check every arithmetic constraint, naming the offending numbers; raises ConfigError before any allocation."""
    m, p, t, o, d = config.model, config.parallel, config.train, config.optim, config.data
    tp, pp, vl = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.num_layers_per_virtual_pipeline_stage
    dp = max(world_size // max(tp * pp, 1), 1)
    raise_if(step_schedule_problems(config, dp))    # every batch size below comes from it
    batch_ok = t.micro_batch_size >= 1 and final_global_batch_size(config, dp) % (t.micro_batch_size * dp) == 0
    problems = layout_problems(tp, pp, world_size=world_size, num_attention_heads=m.num_attention_heads,
                               num_layers=m.num_layers, ffn_size=m.ffn_size)
    if vl is not None:
        if pp < 2:
            problems.append("--num-layers-per-virtual-pipeline-stage needs pipeline-model-parallel-size > 1")
        elif m.num_layers % (pp * vl) != 0:
            problems.append(f"num-layers {m.num_layers} is not divisible by pipeline-model-parallel-size {pp} x "
                            f"num-layers-per-virtual-pipeline-stage {vl}")
        else:
            problems += layout_problems(tp, pp, virtual_chunks=num_model_chunks(config),
                                        num_microbatches=num_microbatches(config, dp) if batch_ok else None)
    problems += pipeline_schedule_problems(config)
    if m.hidden_size % m.num_attention_heads != 0:
        problems.append(f"hidden-size {m.hidden_size} is not divisible by num-attention-heads {m.num_attention_heads}")
    else:
        problems += variant_problems(m, tp)
    if m.seq_length > m.max_positions:
        problems.append(f"seq-length {m.seq_length} exceeds max-position-embeddings {m.max_positions}")
    if p.sequence_parallel and m.seq_length % tp != 0:
        problems.append(f"seq-length {m.seq_length} is not divisible by tensor-model-parallel-size {tp} "
                        "(needed by --sequence-parallel)")
    if not batch_ok:
        problems.append(f"global-batch-size {final_global_batch_size(config, dp)} is not divisible by micro-batch-size "
                        f"{t.micro_batch_size} x data-parallel size {dp}")
    if p.deepspeed:
        if pp != 1:
            problems.append(f"--deepspeed runs tensor and data parallelism only, got pipeline-model-parallel-size "
                            f"{pp}: pipelining under DeepSpeed needs its PipelineModule (use the native path for PP)")
        if p.use_distributed_optimizer:
            problems.append("--deepspeed and --use-distributed-optimizer both shard the optimizer: the ZeRO stage "
                            "comes from the DeepSpeed config")
        if t.rampup_batch_size or t.step_batch_size_schedule:
            problems.append("--deepspeed fixes its gradient accumulation steps at start-up: --rampup-batch-size and "
                            "--step-batch-size-schedule run on the native path only")
        native_only = [flag for flag, on in (("--finetune", t.finetune), ("--no-load-optim", t.no_load_optim),
                                             ("--no-load-rng", t.no_load_rng), ("--no-save-optim", t.no_save_optim),
                                             ("--no-save-rng", t.no_save_rng),
                                             ("--keep-last-n-checkpoints", t.keep_last_n_checkpoints),
                                             ("--async-save", t.async_save), ("--ckpt-step", t.ckpt_step)) if on]
        if native_only:
            problems.append(f"{', '.join(native_only)}: native checkpoints only, not with --deepspeed")
        if p.sequence_parallel:
            problems.append("--deepspeed does not run --sequence-parallel: its LayerNorm grads need the TP all-reduce "
                            "of megagpt's native optimizer path")
    length = run_length_problems(config, dp) if batch_ok else []
    problems += length
    if batch_ok and not length:
        steps = schedule_steps(config, dp)
        problems += schedule_problems(o.lr, o.min_lr, steps["warmup"], steps["decay"], o.lr_decay_style)
    problems += optimizer_problems(o)
    problems += logging_problems(config)
    if config.diagnostics.on_spike == "rollback" and config.diagnostics.check_for_spiky_loss and not (
            t.save and (t.save_interval or t.non_persistent_save_interval)):
        problems.append("--on-spike rollback reloads the newest checkpoint of this run: give --save and "
                        "--save-interval (or --non-persistent-save-interval)")
    if config.diagnostics.on_spike == "rollback" and p.deepspeed:
        problems.append("--on-spike rollback: native engine only (DeepSpeed runs no loss-spike check)")
    if any(i < 1 for i in t.iterations_to_skip):
        problems.append(f"--iterations-to-skip takes 1-based iterations, got {sorted(t.iterations_to_skip)}")
    if t.ckpt_step is not None and (t.ckpt_step < 1 or not t.load):
        problems.append(f"--ckpt-step {t.ckpt_step} names an iteration of --load to resume from: it needs --load and "
                        f"an iteration >= 1")
    if t.non_persistent_ckpt_type not in (None, "global"):
        problems.append(f"--non-persistent-ckpt-type {t.non_persistent_ckpt_type} is not supported: only global "
                        f"(a full checkpoint in --non-persistent-global-ckpt-dir)")
    if t.non_persistent_save_interval and not t.save:
        problems.append("--non-persistent-save-interval needs --save")
    if t.async_save and not t.save:
        problems.append("--async-save needs --save (the directory to write to)")
    problems += [f"{flag} must be positive, got {value}" for flag, value in (
        ("--keep-last-n-checkpoints", t.keep_last_n_checkpoints), ("--exit-interval", t.exit_interval),
        ("--exit-duration-in-mins", t.exit_duration_in_mins)) if value is not None and value <= 0]
    problems += data_problems(d)
    problems += diagnostics_problems(config.diagnostics)
    raise_if(problems)


# ---------------------------------------------------------------- model variants (issue #15: RoPE, GQA, SwiGLU, ...)

def variant_problems(m: ModelConfig, tp: int, what: str = "") -> list[str]:
    """What the model variant flags cannot build at tensor-parallel size `tp` (also asked by checkpoint conversion,
    with `what` = "target ")."""
    problems = []
    heads, groups = m.num_attention_heads, m.query_groups
    if m.group_query_attention:
        if groups < 1 or heads % groups:
            problems.append(f"num-attention-heads {heads} is not divisible by num-query-groups {groups}")
        elif tp >= 1 and groups % tp:
            problems.append(f"num-query-groups {groups} is not divisible by {what}tensor-model-parallel-size {tp}: "
                            f"each TP rank must own whole key/value groups")
    if m.position_embedding_type == "rope":
        if not 0.0 < m.rotary_percent <= 1.0:
            problems.append(f"--rotary-percent must be in (0, 1], got {m.rotary_percent}")
        elif m.rotary_dim < 2 or m.rotary_dim % 2:
            problems.append(f"RoPE rotates int(head dim {m.head_dim} x rotary-percent {m.rotary_percent}) = "
                            f"{m.rotary_dim} dims: need an even number >= 2")
        if m.rotary_base <= 0:
            problems.append(f"--rotary-base must be positive, got {m.rotary_base}")
        if m.use_rope_scaling and m.rotary_seq_len_interpolation_factor:
            problems.append("--use-rope-scaling and --rotary-seq-len-interpolation-factor are two RoPE scalings: "
                            "give one")
        if (m.rotary_seq_len_interpolation_factor or 1) < 1 or (m.use_rope_scaling and m.rope_scaling_factor < 1):
            problems.append("RoPE scaling factors must be >= 1")
    if m.layernorm_epsilon <= 0:
        problems.append(f"--norm-epsilon must be positive, got {m.layernorm_epsilon}")
    return problems


def data_problems(d: DataConfig) -> list[str]:
    """Where the data comes from."""
    split_paths = d.train_data_path or d.valid_data_path or d.test_data_path
    problems = []
    if d.data_path and split_paths:
        problems.append("give --data-path (with --split) or --train/--valid/--test-data-path, not both")
    elif not d.mock_data and not d.data_path and not d.train_data_path:
        problems.append("no --data-path or --train-data-path given (or pass --mock-data)")
    return problems


def logging_problems(config: Config) -> list[str]:
    """Observability flags that cannot run (LoggingConfig); whether wandb is installed is training.setup's check."""
    lg, t = config.logging, config.train
    problems = []
    if lg.tensorboard_log_interval < 1:
        problems.append(f"--tensorboard-log-interval must be >= 1, got {lg.tensorboard_log_interval}")
    if lg.manual_gc_interval < 0:
        problems.append(f"--manual-gc-interval must be >= 0, got {lg.manual_gc_interval}")
    if lg.profile:
        if not 0 <= lg.profile_step_start < lg.profile_step_end:
            problems.append(f"need 0 <= --profile-step-start ({lg.profile_step_start}) < --profile-step-end "
                            f"({lg.profile_step_end})")
        if not (t.tensorboard_dir or t.save):
            problems.append("--profile writes its trace beside the TensorBoard logs or the checkpoints: give "
                            "--tensorboard-dir or --save")
    if config.parallel.deepspeed:
        native_only = [flag for flag, on in (("--log-params-norm", lg.log_params_norm),
                                             ("--log-num-zeros-in-grad", config.optim.log_num_zeros_in_grad)) if on]
        if native_only:
            problems.append(f"{', '.join(native_only)}: computed by megagpt's native optimizer, not with --deepspeed")
    return problems


def diagnostics_problems(g: DiagnosticsConfig) -> list[str]:
    problems = []
    if g.watchdog_timeout_seconds < 0:
        problems.append(f"--watchdog-timeout-seconds must be >= 0 (0: off), got {g.watchdog_timeout_seconds}")
    if g.check_for_spiky_loss and g.spiky_loss_factor <= 1:
        problems.append(f"--spiky-loss-factor must be > 1, got {g.spiky_loss_factor}")
    if g.check_replica_consistency_interval is not None and g.check_replica_consistency_interval <= 0:
        problems.append(f"--check-replica-consistency-interval must be positive, got "
                        f"{g.check_replica_consistency_interval}")
    return problems


def raise_if(problems: list[str], heading: str = "invalid configuration") -> None:
    """One ConfigError listing every problem (nothing when the list is empty)."""
    if problems:
        raise ConfigError(f"{heading}:\n  - " + "\n  - ".join(problems))


def non_persistent_dir(t: TrainConfig) -> Optional[str]:
    """Where --non-persistent-save-interval checkpoints go: the flag's directory, else <save>/non_persistent."""
    base = t.save or t.load
    return t.non_persistent_global_ckpt_dir or (os.path.join(base, "non_persistent") if base else None)


def all_data_prefixes(d: DataConfig) -> list[str]:
    """Every dataset prefix a run reads: --data-path's and the per-split paths'."""
    return [p for path in (d.data_path, d.train_data_path, d.valid_data_path, d.test_data_path)
            for p in data_prefixes(path)]


def data_prefixes(data_path: list) -> list[str]:
    """Prefixes of a Megatron --data-path list (weights, when present, stand before each prefix)."""
    if len(data_path) > 1 and len(data_path) % 2 == 0:
        try:
            float(data_path[0])
            return list(data_path[1::2])
        except ValueError:
            pass
    return list(data_path)
