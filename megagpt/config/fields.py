"""The configuration sections as dataclasses: every field's `help` is its one-line docstring, and cli.py turns each
field into the Megatron-LM flag of the same name (`tensor_model_parallel_size` -> `--tensor-model-parallel-size`)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["pad_vocab_size", "Config", "ConfigError", "DECAY_STYLES", "DataConfig", "DiagnosticsConfig", "LoggingConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "SECTIONS", "TrainConfig", "arg", "num_parameters"]


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
    rotary_seq_len_interpolation_factor: Optional[int] = arg(None, "linear RoPE scaling: positions divided by this "
                                                             "factor (Hugging Face rope_type linear)")
    use_rope_scaling: bool = arg(False, "Llama 3.1 RoPE scaling: low frequencies divided by --rope-scaling-factor, "
                                 "high ones kept, smooth in between (original context 8192, low/high factors 1/4)")
    rope_scaling_factor: float = arg(8.0, "the factor of --use-rope-scaling")
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
    use_cpu_initialization: bool = arg(False, "build the weights on the CPU, then move them (Megatron's flag): the "
                                       "values a CPU run starts from; default: on the GPU, from its generator")
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
    step_batch_size_schedule: Optional[str] = arg(None, "'TOKENS:SIZE TOKENS:SIZE ...': the global batch size from "
                                                  "each token count on (K/M/B/T suffixes; first at 0, the last "
                                                  "size is the final one)")
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
    iterations_to_skip: list = arg([], "1-based iterations that only read their data: no forward, backward, update "
                                   "or LR step (Megatron's; --on-spike rollback adds to it)", nargs="*", type=int)
    ckpt_step: Optional[int] = arg(None, "resume from this iteration of --load instead of the one "
                                   "latest_checkpointed_iteration.txt names (e.g. the one before a damaged save)")
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
    reset_position_ids: bool = arg(False, "position ids restart at 0 after each end-of-document token (learned "
                                   "positions and RoPE)")
    reset_attention_mask: bool = arg(False, "document-causal attention: a token after an end-of-document token "
                                     "attends to none at or before it")


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
    on_spike: str = arg("warn", "on a loss spike: warn, skip the update, or rollback (reload the newest checkpoint "
                        "and skip the iterations since, spike included)",
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


def pad_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 128) -> int:
    """Smallest multiple of `divisible_by * tp_size` >= vocab_size, so every TP rank gets equal, aligned rows."""
    if vocab_size < 1 or tp_size < 1 or divisible_by < 1:
        raise ValueError(f"pad_vocab_size needs positive numbers, got vocab_size={vocab_size}, "
                         f"tp_size={tp_size}, divisible_by={divisible_by}")
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


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
