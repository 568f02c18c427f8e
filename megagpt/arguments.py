"""Configs as dataclasses, Megatron-LM compatible command-line flags, and the one `validate()`.

Every field's `help` is its one-line docstring; the CLI flag is the field name with dashes
(`tensor_model_parallel_size` -> `--tensor-model-parallel-size`), so Megatron scripts port unchanged.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from megagpt.optim.lr_schedule import schedule_problems


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
    clip_grad: float = arg(1.0, "global gradient-norm clip (0 disables)")
    bf16: bool = arg(False, "bf16 parameters and activations, fp32 master weights")
    fp16: bool = arg(False, "fp16 parameters and activations, fp32 master weights, dynamic loss scaling")
    initial_loss_scale: float = arg(2.0 ** 32, "fp16: initial dynamic loss scale")
    min_loss_scale: float = arg(1.0, "fp16: smallest loss scale")
    loss_scale_window: int = arg(1000, "fp16: clean iterations before the scale grows")
    hysteresis: int = arg(2, "fp16: overflows tolerated before the scale backs off")


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
        return cls(**{name: section(**d[name]) for name, section in _SECTIONS.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "optim": OptimConfig,
             "train": TrainConfig, "data": DataConfig}

# GPT-2 sizes from the GPT-2 paper / HF configs; 8.3B from the Megatron-LM paper (72 x 3072, 32 heads).
PRESETS: dict[str, dict[str, int]] = {
    "gpt2-124m": dict(num_layers=12, hidden_size=768, num_attention_heads=12),
    "gpt2-355m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16),
    "gpt2-774m": dict(num_layers=36, hidden_size=1280, num_attention_heads=20),
    "gpt2-1.5b": dict(num_layers=48, hidden_size=1600, num_attention_heads=25),
    "gpt-1.3b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16),   # GPT-3 XL depth/width
    "megatron-8.3b": dict(num_layers=72, hidden_size=3072, num_attention_heads=32),
}


def num_parameters(model: ModelConfig, vocab_size: Optional[int] = None) -> int:
    """Parameter count of the GPT model (tied embeddings counted once)."""
    h, L, f = model.hidden_size, model.num_layers, model.ffn_size
    v = vocab_size if vocab_size is not None else model.vocab_size
    per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # qkv+proj (w+b), fc1, fc2, two LayerNorms
    return v * h + model.max_positions * h + L * per_layer + 2 * h


# ----------------------------------------------------------------------------------------------- CLI

def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="megagpt: 3D-parallel GPT pre-training",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-size", choices=sorted(PRESETS), help="preset sizes (explicit flags override)")
    parser.add_argument("--recompute-activations", action="store_true",
                        help="selective recompute of the attention core (= --recompute-granularity selective)")
    for section, cls in _SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            meta, flag, dest = f.metadata, _flag(f), f"{section}.{f.name}"
            if f.type == "bool":
                action = "store_false" if flag.startswith("--no-") else "store_true"
                group.add_argument(flag, dest=dest, action=action, default=None, help=meta["help"])
                continue
            kind = {"int": int, "float": float}.get(str(f.type).removeprefix("Optional[").rstrip("]"), str)
            kwargs: dict[str, Any] = dict(dest=dest, type=kind, default=None, help=meta["help"])
            if "choices" in meta:
                kwargs["choices"] = [c for c in meta["choices"] if c is not None]
            if "nargs" in meta:
                kwargs["nargs"] = meta["nargs"]
            group.add_argument(flag, **kwargs)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> Config:
    """Parse Megatron-style flags into a Config (presets first, explicit flags win)."""
    ns = build_parser().parse_args(argv)
    config = Config()
    if ns.recompute_activations:
        config.model.recompute_granularity = "selective"
    if ns.model_size:
        for key, value in PRESETS[ns.model_size].items():
            setattr(config.model, key, value)
    for dest, value in vars(ns).items():
        if "." in dest and value is not None:
            section, name = dest.split(".", 1)
            setattr(getattr(config, section), name, value)
    return config


# ------------------------------------------------------------------------------------------ validate

def num_microbatches(config: Config, dp_size: int) -> int:
    t = config.train
    return t.global_batch_size // (t.micro_batch_size * dp_size)


def num_model_chunks(config: Config) -> int:
    """Model chunks per pipeline rank: 1, or layers / (PP x layers per virtual stage) for interleaving."""
    p = config.parallel
    if not p.num_layers_per_virtual_pipeline_stage:
        return 1
    return config.model.num_layers // (p.pipeline_model_parallel_size * p.num_layers_per_virtual_pipeline_stage)


def validate(config: Config, world_size: int) -> None:
    """Check every size constraint, naming the offending numbers; raises ConfigError before any allocation."""
    m, p, t, o, d = config.model, config.parallel, config.train, config.optim, config.data
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    problems: list[str] = []
    if tp < 1 or pp < 1 or world_size % (tp * pp) != 0:
        problems.append(f"world size {world_size} is not divisible by tensor-model-parallel-size {tp} x "
                        f"pipeline-model-parallel-size {pp}")
    dp = max(world_size // max(tp * pp, 1), 1)
    if m.hidden_size % m.num_attention_heads != 0:
        problems.append(f"hidden-size {m.hidden_size} is not divisible by num-attention-heads {m.num_attention_heads}")
    if m.num_attention_heads % tp != 0:
        problems.append(f"num-attention-heads {m.num_attention_heads} is not divisible by "
                        f"tensor-model-parallel-size {tp}")
    if m.ffn_size % tp != 0:
        problems.append(f"ffn-hidden-size {m.ffn_size} is not divisible by tensor-model-parallel-size {tp}")
    if m.num_layers % pp != 0:
        problems.append(f"num-layers {m.num_layers} is not divisible by pipeline-model-parallel-size {pp}")
    vl = p.num_layers_per_virtual_pipeline_stage
    if vl is not None:
        if pp < 2:
            problems.append("--num-layers-per-virtual-pipeline-stage needs pipeline-model-parallel-size > 1")
        elif m.num_layers % (pp * vl) != 0:
            problems.append(f"num-layers {m.num_layers} is not divisible by pipeline-model-parallel-size {pp} x "
                            f"num-layers-per-virtual-pipeline-stage {vl}")
    if m.seq_length > m.max_positions:
        problems.append(f"seq-length {m.seq_length} exceeds max-position-embeddings {m.max_positions}")
    if p.sequence_parallel and m.seq_length % tp != 0:
        problems.append(f"seq-length {m.seq_length} is not divisible by tensor-model-parallel-size {tp} "
                        "(needed by --sequence-parallel)")
    if t.micro_batch_size < 1 or t.global_batch_size % (t.micro_batch_size * dp) != 0:
        problems.append(f"global-batch-size {t.global_batch_size} is not divisible by micro-batch-size "
                        f"{t.micro_batch_size} x data-parallel size {dp}")
    elif vl is not None and pp > 1 and num_microbatches(config, dp) % pp != 0:
        problems.append(f"interleaved schedule needs micro-batches per step ({num_microbatches(config, dp)}) to be a "
                        f"multiple of pipeline-model-parallel-size {pp}")
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
        if p.deepspeed_config and not os.path.exists(p.deepspeed_config):
            problems.append(f"deepspeed config {p.deepspeed_config} does not exist")
    if t.load:
        from megagpt.optim.deepspeed_backend import checkpoint_format_problem  # lazy: it imports this module
        problem = checkpoint_format_problem(t.load, p.deepspeed)
        if problem:
            problems.append(problem)
    problems += schedule_problems(o.lr, o.min_lr, o.lr_warmup_iters, o.lr_decay_iters or t.train_iters,
                                  o.lr_decay_style)
    if o.bf16 and o.fp16:
        problems.append("--bf16 and --fp16 are mutually exclusive")
    if not d.mock_data and not d.data_path:
        problems.append("no --data-path given (or pass --mock-data)")
    for prefix in data_prefixes(d.data_path):
        for ext in (".bin", ".idx"):
            if not os.path.exists(prefix + ext):
                problems.append(f"data file {prefix + ext} does not exist")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def data_prefixes(data_path: list) -> list[str]:
    """Prefixes of a Megatron --data-path list (weights, when present, stand before each prefix)."""
    if len(data_path) > 1 and len(data_path) % 2 == 0:
        try:
            float(data_path[0])
            return list(data_path[1::2])
        except ValueError:
            pass
    return list(data_path)
