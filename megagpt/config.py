"""Configs as dataclasses and their arithmetic validation: the ground floor, importing nothing of megagpt.

Every field's `help` is its one-line docstring; cli.py turns each field into the Megatron-LM flag of the same name
(`tensor_model_parallel_size` -> `--tensor-model-parallel-size`). The layout rules (`layout_problems`) and schedule
rules (`schedule_problems`) live here once and are imported by the process-group builder, the pipeline schedules,
checkpoint conversion and the planner. Checks that touch files or optional backends are training.setup's.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


def arg(default: Any, help: str, **extra: Any) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field whose `help` is both its docstring and its CLI help."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


class ConfigError(ValueError):
    """A configuration that cannot run, reported before any allocation."""


@dataclass
class ModelConfig:
    num_layers: int = arg(12, "number of transformer layers")
    hidden_size: int = arg(768, "transformer hidden size h")
    num_attention_heads: int = arg(12, "attention heads (split across TP ranks)")
    ffn_hidden_size: Optional[int] = arg(None, "MLP hidden size (default 4h)")
    seq_length: int = arg(1024, "tokens per training sample")
    max_position_embeddings: Optional[int] = arg(None, "learned position table size (default seq_length)")
    vocab_size: Optional[int] = arg(None, "tokenizer vocabulary size before padding (set from the tokenizer)")
    make_vocab_size_divisible_by: int = arg(128, "pad the vocabulary to a multiple of this times TP")
    hidden_dropout: float = arg(0.1, "dropout on hidden states (residual branches, embeddings)")
    attention_dropout: float = arg(0.1, "dropout on attention probabilities")
    init_method_std: float = arg(0.02, "std of normal weight init (output projections scaled by 1/sqrt(2L))")
    layernorm_epsilon: float = arg(1e-5, "epsilon of every LayerNorm/RMSNorm (Megatron's --norm-epsilon)",
                                   flag="--norm-epsilon", aliases=["--layernorm-epsilon"])
    # ---- model variants (Megatron-LM's flags; defaults are GPT-2's) ----
    position_embedding_type: str = arg("learned_absolute", "positions: learned_absolute (a learned table added to "
                                       "the embeddings), rope (rotary, applied to q and k) or none",
                                       choices=["learned_absolute", "rope", "none"])
    rotary_base: int = arg(10000, "RoPE base theta: frequencies base^(-2i/d)")
    rotary_percent: float = arg(1.0, "fraction of each head's dims that RoPE rotates (the rest pass through)")
    rotary_interleaved: bool = arg(False, "RoPE rotates pairs (2i, 2i+1) (RoFormer/Meta) instead of (i, i+d/2) "
                                   "(rotate-half: Megatron's and Hugging Face Llama's default)")
    normalization: str = arg("LayerNorm", "norm of every block: LayerNorm (weight and bias) or RMSNorm (weight only)",
                             choices=["LayerNorm", "RMSNorm"])
    swiglu: bool = arg(False, "gated MLP silu(x W_gate) * (x W_up) instead of GELU (ffn default: 8h/3 rounded "
                       "down to a multiple of 64, as Megatron)")
    group_query_attention: bool = arg(False, "grouped-query attention: --num-query-groups key/value heads")
    num_query_groups: int = arg(1, "key/value heads with --group-query-attention (each shared by heads/groups query "
                                "heads; 1 = multi-query)")
    untie_embeddings_and_output_weights: bool = arg(False, "give the LM head its own weight instead of the word "
                                                    "embedding's")
    disable_bias_linear: bool = arg(False, "no bias in any linear layer (QKV, output projection, MLP)")
    add_qkv_bias: bool = arg(False, "keep the QKV bias under --disable-bias-linear (Qwen-style)")
    qk_layernorm: bool = arg(False, "normalise each query and key head (over head_dim) with --normalization before "
                             "attention")
    attention_softmax_in_fp32: bool = arg(True, "compute the attention softmax in fp32 under bf16/fp16")
    attention_backend: str = arg("auto", "attention core: flash (torch scaled_dot_product_attention: flash / memory-"
                                 "efficient kernels on GPU), fused (our fused softmax kernel; = Megatron's local), "
                                 "unfused (plain softmax), auto (flash)",
                                 choices=["auto", "flash", "fused", "unfused", "local"])
    masked_softmax_fusion: bool = arg(True, "use the fused CUDA softmax when available",
                                      flag="--no-masked-softmax-fusion")
    recompute_granularity: Optional[str] = arg(None, "activation recompute: 'selective' (attention core) or 'full'",
                                               choices=[None, "selective", "full"])

    @property
    def ffn_size(self) -> int:
        """--ffn-hidden-size, else 4h, or with --swiglu Megatron's int(8h/3 / 64) * 64 (about 4h's parameters)."""
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return int(4 * self.hidden_size * 2 / 3 / 64) * 64 if self.swiglu else 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        """Key/value heads: --num-query-groups with --group-query-attention, else one per query head."""
        return self.num_query_groups if self.group_query_attention else self.num_attention_heads

    @property
    def qkv_size(self) -> int:
        """Rows of linear_qkv: the queries (h) plus one key and one value head per query group."""
        return (self.num_attention_heads + 2 * self.query_groups) * self.head_dim

    @property
    def add_bias_linear(self) -> bool:
        return not self.disable_bias_linear

    @property
    def qkv_bias(self) -> bool:
        """Megatron: --add-qkv-bias follows the linear bias unless --disable-bias-linear turns that off."""
        return self.add_bias_linear or self.add_qkv_bias

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates: int(head_dim x --rotary-percent), as Megatron."""
        return int(self.head_dim * self.rotary_percent)

    @property
    def attention_core(self) -> str:
        """The attention core that runs: "flash" (for auto and flash), "fused" (also Megatron's local: its own
        dot-product attention with the fused softmax) or "unfused"."""
        return {"auto": "flash", "local": "fused"}.get(self.attention_backend, self.attention_backend)

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = arg(1, "tensor-parallel ranks (TP)")
    pipeline_model_parallel_size: int = arg(1, "pipeline stages (PP)")
    num_layers_per_virtual_pipeline_stage: Optional[int] = arg(None, "layers per virtual stage (interleaved 1F1B)")
    pipeline_schedule: Optional[str] = arg(None, "pipeline schedule: 1f1b, interleaved, zb-h1 or zb-v (default: "
                                           "interleaved with --num-layers-per-virtual-pipeline-stage, else 1f1b)",
                                           choices=[None, "1f1b", "interleaved", "zb-h1", "zb-v"])
    sequence_parallel: bool = arg(False, "keep LayerNorm/dropout activations split along the sequence over TP")
    use_distributed_optimizer: bool = arg(False, "ZeRO: shard fp32 master weights and Adam state over DP")
    zero_stage: int = arg(1, "ZeRO stage with --use-distributed-optimizer: 1 shards optimizer state, 2 also grads",
                          choices=[1, 2])
    overlap_grad_reduce: bool = arg(False, "launch each grad bucket's DP reduction as soon as it is ready")
    ddp_bucket_size: int = arg(40_000_000, "elements per gradient bucket")
    distributed_backend: Optional[str] = arg(None, "nccl or gloo (default: nccl with CUDA, else gloo)")
    deepspeed: bool = arg(False, "hand the model to deepspeed.initialize (ZeRO 1-3, offload; TP x DP, PP = 1)")
    deepspeed_config: Optional[str] = arg(None, "DeepSpeed JSON config (batch sizes and precision are set from ours)")


@dataclass
class OptimConfig:
    lr: float = arg(6e-4, "peak learning rate")
    min_lr: float = arg(0.0, "learning rate at the end of decay")
    lr_warmup_iters: int = arg(0, "linear warmup iterations")
    lr_warmup_samples: int = arg(0, "linear warmup samples (sample-based training)")
    lr_warmup_fraction: Optional[float] = arg(None, "warmup as a fraction of the decay length")
    lr_warmup_init: float = arg(0.0, "learning rate at the start of warmup")
    lr_decay_iters: Optional[int] = arg(None, "decay iterations (default train_iters)")
    lr_decay_samples: Optional[int] = arg(None, "decay samples (default train_samples)")
    lr_decay_style: str = arg("linear", "learning-rate decay", choices=list(DECAY_STYLES))
    lr_wsd_decay_style: str = arg("exponential", "WSD: shape of the final decay",
                                  choices=["exponential", "linear", "cosine", "minus_sqrt"])
    lr_wsd_decay_iters: Optional[int] = arg(None, "WSD: iterations of the final decay")
    lr_wsd_decay_samples: Optional[int] = arg(None, "WSD: samples of the final decay")
    override_opt_param_scheduler: bool = arg(False, "on resume, take the schedule from the flags, not the checkpoint",
                                             flag="--override-opt_param-scheduler",
                                             aliases=["--override-opt-param-scheduler"])
    use_checkpoint_opt_param_scheduler: bool = arg(False, "on resume, take the schedule from the checkpoint",
                                                   flag="--use-checkpoint-opt_param-scheduler",
                                                   aliases=["--use-checkpoint-opt-param-scheduler"])
    weight_decay: float = arg(0.01, "AdamW weight decay (not applied to biases and LayerNorm)")
    start_weight_decay: Optional[float] = arg(None, "weight decay at the start (--weight-decay-incr-style not constant)")
    end_weight_decay: Optional[float] = arg(None, "weight decay at the end (--weight-decay-incr-style not constant)")
    weight_decay_incr_style: str = arg("constant", "weight-decay change over training",
                                       choices=["constant", "linear", "cosine"])
    adam_beta1: float = arg(0.9, "Adam beta1")
    adam_beta2: float = arg(0.999, "Adam beta2")
    adam_eps: float = arg(1e-8, "Adam epsilon")
    optimizer: str = arg("adam", "adam (AdamW, decoupled weight decay) or sgd", choices=["adam", "sgd"])
    sgd_momentum: float = arg(0.9, "SGD momentum")
    clip_grad: float = arg(1.0, "global gradient-norm clip (0 disables; the norm is still computed)")
    bf16: bool = arg(False, "bf16 parameters and activations, fp32 master weights")
    fp16: bool = arg(False, "fp16 parameters and activations, fp32 master weights, dynamic loss scaling")
    loss_scale: Optional[float] = arg(None, "fp16: constant loss scale (default: dynamic scaling)")
    initial_loss_scale: float = arg(2.0 ** 32, "fp16: initial dynamic loss scale")
    min_loss_scale: float = arg(1.0, "fp16: smallest loss scale")
    loss_scale_window: int = arg(1000, "fp16: clean iterations before the scale grows")
    hysteresis: int = arg(2, "fp16: overflows tolerated before the scale backs off")
    log_num_zeros_in_grad: bool = arg(False, "count zero gradient entries every step")


@dataclass
class TrainConfig:
    micro_batch_size: int = arg(4, "samples per micro-batch per DP rank")
    global_batch_size: Optional[int] = arg(None, "samples per optimizer step over all DP ranks "
                                                 "(default micro-batch-size x DP)")
    rampup_batch_size: Optional[list] = arg(None, "START INCREMENT SAMPLES: grow the global batch from START by "
                                            "INCREMENT over SAMPLES samples", nargs=3, type=int)
    train_iters: Optional[int] = arg(None, "optimizer steps (or give --train-samples)")
    train_samples: Optional[int] = arg(None, "samples to train on (sample-based training)")
    eval_interval: int = arg(1000, "evaluate on the validation split every N iterations")
    eval_iters: int = arg(100, "validation micro-batch rounds per evaluation")
    log_interval: int = arg(100, "print the log line every N iterations")
    seed: int = arg(1234, "seed for weights, data order and dropout")
    save: Optional[str] = arg(None, "checkpoint directory to write")
    save_interval: Optional[int] = arg(None, "checkpoint every N iterations")
    load: Optional[str] = arg(None, "checkpoint directory to resume from (missing or empty: start from scratch)")
    finetune: bool = arg(False, "load weights only: iteration 0, fresh optimizer, RNG and data position")
    no_load_optim: bool = arg(False, "do not load optimizer and LR-schedule state (fp32 masters from the weights)")
    no_load_rng: bool = arg(False, "do not load RNG states (keep this run's freshly seeded streams)")
    no_save_optim: bool = arg(False, "leave optimizer and LR-schedule state out of checkpoints")
    no_save_rng: bool = arg(False, "leave RNG states out of checkpoints")
    ckpt_format: str = arg("torch", "checkpoint format: torch (Megatron's legacy per-rank files + metadata.json)",
                           choices=["torch"])
    keep_last_n_checkpoints: Optional[int] = arg(None, "delete older complete checkpoints once a newer one is complete")
    non_persistent_save_interval: Optional[int] = arg(None, "also checkpoint every N iterations into a scratch "
                                                      "directory that keeps only the newest (resume takes the newer "
                                                      "of it and --load)")
    non_persistent_ckpt_type: Optional[str] = arg(None, "global (the only kind here: a full checkpoint in "
                                                  "--non-persistent-global-ckpt-dir)",
                                                  choices=[None, "global", "local", "in_memory"])
    non_persistent_global_ckpt_dir: Optional[str] = arg(None, "where non-persistent checkpoints go (default "
                                                        "<save>/non_persistent)")
    async_save: bool = arg(False, "copy the checkpoint to host memory and write it in the background while training "
                           "goes on (marked complete once every rank has written it)")
    exit_interval: Optional[int] = arg(None, "save and exit after an iteration divisible by N")
    exit_duration_in_mins: Optional[float] = arg(None, "save and exit once training has run this long (agreed by all "
                                                 "ranks)")
    exit_signal_handler: bool = arg(False, "on --exit-signal, finish the iteration, save and exit 0 (all ranks agree)")
    exit_signal: str = arg("SIGTERM", "the signal --exit-signal-handler catches (SLURM sends SIGTERM before "
                           "preemption and time-out)", choices=["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"])
    tensorboard_dir: Optional[str] = arg(None, "write the logged scalars to TensorBoard here")
    num_threads: Optional[int] = arg(None, "torch intra-op threads per process on CPU")
    dry_run: bool = arg(False, "print the plan (memory per pipeline stage, term by term) and exit before any "
                        "process group or allocation")


@dataclass
class DataConfig:
    data_path: list = arg([], "dataset prefixes, optionally weighted: 'pfx' or '0.3 pfxA 0.7 pfxB'", nargs="*")
    split: str = arg("969,30,1", "train,valid,test proportions of documents")
    mock_data: bool = arg(False, "deterministic synthetic tokens instead of files")
    tokenizer_type: str = arg("GPT2BPETokenizer", "GPT2BPETokenizer, HuggingFaceTokenizer or ByteTokenizer")
    vocab_file: Optional[str] = arg(None, "GPT-2 encoder.json/vocab.json (default: the bundled GPT-2 files)")
    merge_file: Optional[str] = arg(None, "GPT-2 vocab.bpe/merges.txt (default: the bundled GPT-2 files)")
    tokenizer_model: Optional[str] = arg(None, "HF tokenizer.json for HuggingFaceTokenizer")
    train_data_path: list = arg([], "training data only (prefixes, optionally weighted): instead of --data-path "
                                "with --split", nargs="*")
    valid_data_path: list = arg([], "validation data only (prefixes, optionally weighted)", nargs="*")
    test_data_path: list = arg([], "test data only (prefixes, optionally weighted)", nargs="*")
    data_cache_path: Optional[str] = arg(None, "where sample-index caches go (default: beside the data)")
    num_workers: int = arg(0, "DataLoader worker processes")
    dataloader_type: str = arg("single", "single: each sample once in order (resumable, layout-independent); cyclic: "
                               "Megatron's per-epoch shuffle within each DP rank's bucket", choices=["single", "cyclic"])
    num_dataset_builder_threads: int = arg(1, "accepted for Megatron scripts: index building here is one C++ pass "
                                           "per dataset, built once by local rank 0")
    mmap_bin_files: bool = arg(True, "memory-map the .bin files (off: read them into memory)",
                               flag="--no-mmap-bin-files")
    eod_mask_loss: bool = arg(False, "leave out of the loss the positions whose input token is end-of-document")
    reset_position_ids: bool = arg(False, "restart position ids after each end-of-document (not supported yet)")
    reset_attention_mask: bool = arg(False, "document-causal attention (not supported yet)")


@dataclass
class LoggingConfig:
    """Observability (Megatron-LM's logging, profiling and GC flags): what is measured and where it is written."""

    timing_log_level: int = arg(0, "timers to report every log interval: 0 none, 1 once-per-iteration spans "
                                "(forward-backward, grad reductions, optimizer), 2 also per-micro-batch spans (data, "
                                "compute, pipeline send/recv; syncs the GPU)", choices=[0, 1, 2])
    timing_log_option: str = arg("minmax", "timer statistics over ranks: max, minmax or all (every rank)",
                                 choices=["max", "minmax", "all"])
    barrier_with_l1_time: bool = arg(True, "no barrier before level-1 timers (by default they start together on "
                                     "all ranks)", flag="--no-barrier-with-level-1-timing")
    tensorboard_log_interval: int = arg(1, "write the per-iteration scalars to TensorBoard every N iterations")
    log_timers_to_tensorboard: bool = arg(False, "write the timers (max over ranks) to TensorBoard")
    log_memory_to_tensorboard: bool = arg(False, "write memory use to TensorBoard (CUDA allocator statistics; on "
                                          "CPU the process's peak RSS and the tensors' bytes)")
    log_validation_ppl_to_tensorboard: bool = arg(False, "write validation perplexity to TensorBoard")
    log_loss_scale_to_tensorboard: bool = arg(True, "leave the loss scale out of TensorBoard",
                                              flag="--no-log-loss-scale-to-tensorboard")
    log_throughput: bool = arg(False, "Megatron's throughput field (megagpt always prints TFLOP/s and tokens/s)")
    log_params_norm: bool = arg(False, "print the L2 norm of all weights (each counted once) every log interval")
    profile: bool = arg(False, "torch.profiler trace of iterations (--profile-step-start, --profile-step-end] on "
                        "--profile-ranks, written to <tensorboard-dir>/../torch_profile (else <save>/torch_profile); "
                        "on CUDA also cudaProfilerStart/Stop around them for nsys --capture-range=cudaProfilerApi")
    use_pytorch_profiler: bool = arg(False, "accepted for Megatron scripts: --profile always writes a torch.profiler "
                                     "trace")
    profile_step_start: int = arg(10, "iteration after which profiling starts")
    profile_step_end: int = arg(12, "last profiled iteration")
    profile_ranks: list = arg([0], "global ranks to profile", nargs="+", type=int)
    pytorch_profiler_collect_shapes: bool = arg(False, "record tensor shapes in the trace")
    pytorch_profiler_collect_callstack: bool = arg(False, "record Python call stacks in the trace")
    record_memory_history: bool = arg(False, "with --profile: memory events in the trace; on CUDA also the "
                                      "allocator history, dumped every log interval to --memory-snapshot-path")
    memory_snapshot_path: str = arg("snapshot.pickle", "CUDA allocator history file (rank appended: snapshot_0.pickle)")
    wandb_project: Optional[str] = arg(None, "log the scalars to this Weights & Biases project (last rank)")
    wandb_exp_name: Optional[str] = arg(None, "W&B run name (default: W&B's)")
    wandb_save_dir: Optional[str] = arg(None, "W&B files (default <save>/wandb, else ./wandb)")
    wandb_entity: Optional[str] = arg(None, "W&B entity (team or user)")
    manual_gc: bool = arg(False, "turn Python's automatic garbage collector off and collect on every rank at the same "
                          "iterations (steadier step times)")
    manual_gc_interval: int = arg(0, "with --manual-gc: collect every N iterations (0: only around evaluation)")
    manual_gc_eval: bool = arg(True, "with --manual-gc: no collection before and after evaluation",
                               flag="--no-manual-gc-eval")


@dataclass
class DiagnosticsConfig:
    """When a run goes wrong: watchdog and hang forensics, numerical guardrails, straggler report (diagnostics/)."""

    watchdog_timeout_seconds: float = arg(600.0, "no progress for this long on a rank: write hang reports, print "
                                          "a summary naming the rank that did not arrive, exit non-zero (0: off)")
    hang_report_dir: Optional[str] = arg(None, "where hang_report/ goes (default: --save, else --tensorboard-dir, "
                                         "else the working directory)")
    check_schedule: bool = arg(True, "before the first step, simulate every rank's pipeline instruction list and "
                               "refuse unmatched sends/receives", flag="--no-check-schedule")
    check_for_nan_in_loss_and_grad: bool = arg(True, "detect NaN/Inf in the loss and gradients after the backward "
                                               "(agreed by all ranks)", flag="--no-check-for-nan-in-loss-and-grad")
    on_nan: str = arg("abort", "on NaN/Inf: abort (exit non-zero, save nothing) or skip the update",
                      choices=["abort", "skip"])
    check_for_spiky_loss: bool = arg(False, "compare each step's loss with the running mean of the last 100")
    spiky_loss_factor: float = arg(10.0, "a loss above this factor x the running mean is a spike")
    on_spike: str = arg("warn", "on a loss spike: warn, or skip the update (rollback: not available yet)",
                        choices=["warn", "skip", "rollback"])
    check_replica_consistency_interval: Optional[int] = arg(None, "every N iterations, compare a hash of the "
                                                            "parameters across data-parallel replicas")
    log_straggler: bool = arg(False, "every log interval, print the slowest ranks' step time against the median")


@dataclass
class Config:
    """The whole resolved configuration: printed at start-up and saved in checkpoints."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        # A section newer than the checkpoint (e.g. logging) takes its defaults.
        return cls(**{name: section(**d.get(name, {})) for name, section in SECTIONS.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "optim": OptimConfig,
             "train": TrainConfig, "data": DataConfig, "logging": LoggingConfig, "diagnostics": DiagnosticsConfig}


def num_parameters(model: ModelConfig, vocab_size: Optional[int] = None) -> int:
    """Parameter count of the GPT model (tied embeddings counted once; an untied LM head adds V h)."""
    h, L, f, m = model.hidden_size, model.num_layers, model.ffn_size, model
    v = vocab_size if vocab_size is not None else model.vocab_size
    per_norm_element = 2 if m.normalization == "LayerNorm" else 1   # weight and bias, or RMSNorm's weight
    norm = per_norm_element * h
    fc1 = 2 * f if m.swiglu else f
    per_layer = (m.qkv_size * h + (m.qkv_size if m.qkv_bias else 0) + h * h + fc1 * h + f * h   # GEMMs, QKV bias
                 + ((h + fc1 + h) if m.add_bias_linear else 0)                                  # proj, fc1, fc2 bias
                 + 2 * norm + (2 * per_norm_element * m.head_dim if m.qk_layernorm else 0))     # block, q/k norms
    positions = model.max_positions * h if m.position_embedding_type == "learned_absolute" else 0
    head = v * h if m.untie_embeddings_and_output_weights else 0
    return v * h + positions + L * per_layer + norm + head


# ------------------------------------------------------------------------------------------------ rules

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


# --------------------------------------------------------------------------- batch size and run length

def final_global_batch_size(config: Config, dp_size: int) -> int:
    """--global-batch-size, or Megatron's default micro-batch-size x DP (one micro-batch per step)."""
    t = config.train
    return t.global_batch_size if t.global_batch_size is not None else t.micro_batch_size * dp_size


def global_batch_size_at(config: Config, dp_size: int, consumed_samples: int) -> int:
    """The global batch size of the step that starts after `consumed_samples` (Megatron's ramp-up: from START,
    +INCREMENT every SAMPLES / ((final - START) / INCREMENT) samples, the final size once SAMPLES are passed)."""
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


def validate(config: Config, world_size: int) -> None:
    """Check every arithmetic constraint, naming the offending numbers; raises ConfigError before any allocation."""
    m, p, t, o, d = config.model, config.parallel, config.train, config.optim, config.data
    tp, pp, vl = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.num_layers_per_virtual_pipeline_stage
    dp = max(world_size // max(tp * pp, 1), 1)
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
        if t.rampup_batch_size:
            problems.append("--deepspeed fixes its gradient accumulation steps at start-up: --rampup-batch-size "
                            "runs on the native path only")
        native_only = [flag for flag, on in (("--finetune", t.finetune), ("--no-load-optim", t.no_load_optim),
                                             ("--no-load-rng", t.no_load_rng), ("--no-save-optim", t.no_save_optim),
                                             ("--no-save-rng", t.no_save_rng),
                                             ("--keep-last-n-checkpoints", t.keep_last_n_checkpoints),
                                             ("--async-save", t.async_save)) if on]
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
    if m.layernorm_epsilon <= 0:
        problems.append(f"--norm-epsilon must be positive, got {m.layernorm_epsilon}")
    return problems


def data_problems(d: DataConfig) -> list[str]:
    """Where the data comes from, and the Megatron data options megagpt does not run yet."""
    split_paths = d.train_data_path or d.valid_data_path or d.test_data_path
    problems = []
    if d.data_path and split_paths:
        problems.append("give --data-path (with --split) or --train/--valid/--test-data-path, not both")
    elif not d.mock_data and not d.data_path and not d.train_data_path:
        problems.append("no --data-path or --train-data-path given (or pass --mock-data)")
    problems += [f"{flag} is not supported yet: drop it (documents are packed with causal attention across "
                 f"boundaries and learned positions count from the sample start, as Megatron's default)"
                 for flag, on in (("--reset-position-ids", d.reset_position_ids),
                                  ("--reset-attention-mask", d.reset_attention_mask)) if on]
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
    if g.on_spike == "rollback":
        problems.append("--on-spike rollback (reload the last checkpoint, skip the data since) is not available "
                        "yet: use warn or skip")
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
