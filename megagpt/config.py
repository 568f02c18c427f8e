"""Configs as dataclasses and their arithmetic validation: the ground floor, importing nothing of megagpt.

Every field's `help` is its one-line docstring; cli.py turns each field into the Megatron-LM flag of the same name
(`tensor_model_parallel_size` -> `--tensor-model-parallel-size`). The layout rules (`layout_problems`) and schedule
rules (`schedule_problems`) live here once and are imported by the process-group builder, the pipeline schedules,
checkpoint conversion and the planner. Checks that touch files or optional backends are training.setup's.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

DECAY_STYLES = ("cosine", "linear", "constant")


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
    layernorm_epsilon: float = arg(1e-5, "LayerNorm epsilon")
    attention_softmax_in_fp32: bool = arg(True, "compute the attention softmax in fp32 under bf16/fp16")
    masked_softmax_fusion: bool = arg(True, "use the fused CUDA softmax when available",
                                      flag="--no-masked-softmax-fusion")
    recompute_granularity: Optional[str] = arg(None, "activation recompute: 'selective' (attention core) or 'full'",
                                               choices=[None, "selective", "full"])

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

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
    min_lr: float = arg(6e-5, "learning rate at the end of decay")
    lr_warmup_iters: int = arg(0, "linear warmup iterations")
    lr_decay_iters: Optional[int] = arg(None, "decay iterations (default train_iters)")
    lr_decay_style: str = arg("cosine", "learning-rate decay", choices=["cosine", "linear", "constant"])
    weight_decay: float = arg(0.1, "AdamW weight decay (not applied to biases and LayerNorm)")
    adam_beta1: float = arg(0.9, "Adam beta1")
    adam_beta2: float = arg(0.95, "Adam beta2")
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
    global_batch_size: int = arg(32, "samples per optimizer step over all DP ranks")
    train_iters: int = arg(100, "optimizer steps")
    eval_interval: int = arg(1000, "evaluate on the validation split every N iterations")
    eval_iters: int = arg(10, "validation micro-batch rounds per evaluation")
    log_interval: int = arg(10, "print the log line every N iterations")
    seed: int = arg(1234, "seed for weights, data order and dropout")
    save: Optional[str] = arg(None, "checkpoint directory to write")
    save_interval: Optional[int] = arg(None, "checkpoint every N iterations")
    load: Optional[str] = arg(None, "checkpoint directory to resume from")
    tensorboard_dir: Optional[str] = arg(None, "write the logged scalars to TensorBoard here")
    num_threads: Optional[int] = arg(None, "torch intra-op threads per process on CPU")


@dataclass
class DataConfig:
    data_path: list = arg([], "dataset prefixes, optionally weighted: 'pfx' or '0.3 pfxA 0.7 pfxB'", nargs="*")
    split: str = arg("969,30,1", "train,valid,test proportions of documents")
    mock_data: bool = arg(False, "deterministic synthetic tokens instead of files")
    tokenizer_type: str = arg("GPT2BPETokenizer", "GPT2BPETokenizer, HuggingFaceTokenizer or ByteTokenizer")
    vocab_file: Optional[str] = arg(None, "GPT-2 encoder.json/vocab.json (default: the bundled GPT-2 files)")
    merge_file: Optional[str] = arg(None, "GPT-2 vocab.bpe/merges.txt (default: the bundled GPT-2 files)")
    tokenizer_model: Optional[str] = arg(None, "HF tokenizer.json for HuggingFaceTokenizer")
    data_cache_path: Optional[str] = arg(None, "where sample-index caches go (default: beside the data)")
    num_workers: int = arg(0, "DataLoader worker processes")


@dataclass
class Config:
    """The whole resolved configuration: printed at start-up and saved in checkpoints."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return cls(**{name: section(**d[name]) for name, section in SECTIONS.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "optim": OptimConfig,
             "train": TrainConfig, "data": DataConfig}


def num_parameters(model: ModelConfig, vocab_size: Optional[int] = None) -> int:
    """Parameter count of the GPT model (tied embeddings counted once)."""
    h, L, f = model.hidden_size, model.num_layers, model.ffn_size
    v = vocab_size if vocab_size is not None else model.vocab_size
    per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # qkv+proj (w+b), fc1, fc2, two LayerNorms
    return v * h + model.max_positions * h + L * per_layer + 2 * h


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


def schedule_problems(max_lr: float, min_lr: float, warmup_iters: int, decay_iters: Optional[int],
                      decay_style: str) -> list[str]:
    """What makes a learning-rate schedule invalid, in terms of the training flags (empty when it is valid)."""
    problems = []
    if decay_style not in DECAY_STYLES:
        problems.append(f"--lr-decay-style must be one of {DECAY_STYLES}, got {decay_style!r}")
    if not 0.0 <= min_lr <= max_lr:
        problems.append(f"need 0 <= --min-lr ({min_lr}) <= --lr ({max_lr})")
    if warmup_iters < 0:
        problems.append(f"--lr-warmup-iters must be >= 0, got {warmup_iters}")
    if decay_style != "constant":
        if decay_iters is None:
            problems.append(f"--lr-decay-style {decay_style} needs decay iterations (--lr-decay-iters or --train-iters)")
        elif decay_iters <= warmup_iters:
            problems.append(f"decay iterations ({decay_iters}, --lr-decay-iters or --train-iters) must exceed "
                            f"--lr-warmup-iters ({warmup_iters})")
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


def num_microbatches(config: Config, dp_size: int) -> int:
    t = config.train
    return t.global_batch_size // (t.micro_batch_size * dp_size)


def num_model_chunks(config: Config) -> int:
    """Model chunks per pipeline rank: 1, or layers / (PP x layers per virtual stage) for interleaving."""
    p = config.parallel
    if not p.num_layers_per_virtual_pipeline_stage:
        return 1
    return max(config.model.num_layers // (p.pipeline_model_parallel_size * p.num_layers_per_virtual_pipeline_stage),
               1)


def validate(config: Config, world_size: int) -> None:
    """Check every arithmetic constraint, naming the offending numbers; raises ConfigError before any allocation."""
    m, p, t, o, d = config.model, config.parallel, config.train, config.optim, config.data
    tp, pp, vl = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.num_layers_per_virtual_pipeline_stage
    dp = max(world_size // max(tp * pp, 1), 1)
    batch_ok = t.micro_batch_size >= 1 and t.global_batch_size % (t.micro_batch_size * dp) == 0
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
    if m.hidden_size % m.num_attention_heads != 0:
        problems.append(f"hidden-size {m.hidden_size} is not divisible by num-attention-heads {m.num_attention_heads}")
    if m.seq_length > m.max_positions:
        problems.append(f"seq-length {m.seq_length} exceeds max-position-embeddings {m.max_positions}")
    if p.sequence_parallel and m.seq_length % tp != 0:
        problems.append(f"seq-length {m.seq_length} is not divisible by tensor-model-parallel-size {tp} "
                        "(needed by --sequence-parallel)")
    if not batch_ok:
        problems.append(f"global-batch-size {t.global_batch_size} is not divisible by micro-batch-size "
                        f"{t.micro_batch_size} x data-parallel size {dp}")
    if p.deepspeed:
        if pp != 1:
            problems.append(f"--deepspeed runs tensor and data parallelism only, got pipeline-model-parallel-size "
                            f"{pp}: pipelining under DeepSpeed needs its PipelineModule (use the native path for PP)")
        if p.use_distributed_optimizer:
            problems.append("--deepspeed and --use-distributed-optimizer both shard the optimizer: the ZeRO stage "
                            "comes from the DeepSpeed config")
        if p.sequence_parallel:
            problems.append("--deepspeed does not run --sequence-parallel: its LayerNorm grads need the TP all-reduce "
                            "of megagpt's native optimizer path")
    problems += schedule_problems(o.lr, o.min_lr, o.lr_warmup_iters, o.lr_decay_iters or t.train_iters,
                                  o.lr_decay_style)
    problems += optimizer_problems(o)
    if not d.mock_data and not d.data_path:
        problems.append("no --data-path given (or pass --mock-data)")
    raise_if(problems)


def raise_if(problems: list[str], heading: str = "invalid configuration") -> None:
    """One ConfigError listing every problem (nothing when the list is empty)."""
    if problems:
        raise ConfigError(f"{heading}:\n  - " + "\n  - ".join(problems))


def data_prefixes(data_path: list) -> list[str]:
    """Prefixes of a Megatron --data-path list (weights, when present, stand before each prefix)."""
    if len(data_path) > 1 and len(data_path) % 2 == 0:
        try:
            float(data_path[0])
            return list(data_path[1::2])
        except ValueError:
            pass
    return list(data_path)
