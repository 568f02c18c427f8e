"""Hugging Face Llama (`LlamaForCausalLM`) <-> megagpt checkpoints, in any megagpt TP x PP layout.

A Llama is megagpt's model with `--position-embedding-type rope --normalization RMSNorm --swiglu
--group-query-attention --num-query-groups G --disable-bias-linear` (biases: `attention_bias` and `mlp_bias` both
on is megagpt's linear bias everywhere) and, unless the HF config ties them, `--untie-embeddings-and-output-weights`.
The differences are storage only:
- HF keeps q_proj `[n d, h]`, k_proj and v_proj `[G d, h]`; megagpt's linear_qkv groups them per query group,
  `[q_g0 (n/G heads) k_g0 v_g0 | q_g1 ...]`, so a contiguous TP split gives each rank whole groups;
- HF's gate_proj and up_proj are megagpt's fc1 `[gate | up]` (each TP rank then holds `[gate_r | up_r]`);
- RoPE convention. HF Llama rotates dim pairs (k, k + d/2) ("rotate-half", Megatron's default as well): megagpt's
  default model needs no permutation. A megagpt model trained with `--rotary-interleaved` pairs (2k, 2k + 1); its
  q and k rows are permuted per head on export, interleaved row 2k <- HF row k and 2k + 1 <- HF row k + d/2
  (`_interleave`), and back on import with `rotary_interleaved=True`. This is the inverse of the permutation
  Hugging Face's convert_llama_weights_to_hf.py applies to Meta's (interleaved) checkpoints. Any permutation
  applied to both q and k within a head leaves every q.k product, so the model, unchanged;
- megagpt pads the vocabulary and masks the padding out of the logits.
Export then import is bit-exact; logits match transformers' within fp32 rounding. RoPE scaling: linear (Megatron's
--rotary-seq-len-interpolation-factor) and llama3 (--use-rope-scaling) convert both ways. Refused (with the reason):
other rope types (yarn, dynamic, ...), partial rotary, q/k norms, biases on only some linears, head_dim other
than hidden/heads, and any non-Llama model_type (sliding windows, MoE: Mistral, Mixtral, Qwen ...).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch

from megagpt.checkpoint.hf_common import (Pair, export_weights, import_model, read_config, refuse, save_pretrained,
                                          shape_problems)
from megagpt.config import Config, ModelConfig
from megagpt.model.gpt import OUTPUT_LAYER, WORD_EMBEDDING
from megagpt.model.rotary import LLAMA3_HIGH_FREQ_FACTOR, LLAMA3_LOW_FREQ_FACTOR, LLAMA3_ORIGINAL_CONTEXT


def _pairs(m: dict) -> list[Pair]:
    """Every parameter of the megagpt model `m` (a ModelConfig dict) with its HF name, conversion and HF shape.

    how: 'copy'; 'qkv' (megagpt's linear_qkv <-> q_proj, k_proj, v_proj: the HF name is q_proj's, `.weight` or
    `.bias`); 'glu' (linear_fc1 <-> gate_proj, up_proj)."""
    cfg = ModelConfig(**m)
    h, f, d, n, g = cfg.hidden_size, cfg.ffn_size, cfg.head_dim, cfg.num_attention_heads, cfg.query_groups
    pairs = [Pair("model.embed_tokens.weight", WORD_EMBEDDING, "copy", (m["vocab_size"], h))]
    for i in range(cfg.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        pairs += [Pair(hf + "input_layernorm.weight", mg + "input_layernorm.weight", "copy", (h,)),
                  Pair(hf + "self_attn.q_proj.weight", mg + "self_attention.linear_qkv.weight", "qkv", (n * d, h)),
                  Pair(hf + "self_attn.o_proj.weight", mg + "self_attention.linear_proj.weight", "copy", (h, h)),
                  Pair(hf + "post_attention_layernorm.weight", mg + "pre_mlp_layernorm.weight", "copy", (h,)),
                  Pair(hf + "mlp.gate_proj.weight", mg + "mlp.linear_fc1.weight", "glu", (f, h)),
                  Pair(hf + "mlp.down_proj.weight", mg + "mlp.linear_fc2.weight", "copy", (h, f))]
        if cfg.add_bias_linear:
            pairs += [Pair(hf + "self_attn.q_proj.bias", mg + "self_attention.linear_qkv.bias", "qkv", (n * d,)),
                      Pair(hf + "self_attn.o_proj.bias", mg + "self_attention.linear_proj.bias", "copy", (h,)),
                      Pair(hf + "mlp.gate_proj.bias", mg + "mlp.linear_fc1.bias", "glu", (f,)),
                      Pair(hf + "mlp.down_proj.bias", mg + "mlp.linear_fc2.bias", "copy", (h,))]
    pairs.append(Pair("model.norm.weight", "decoder.final_layernorm.weight", "copy", (h,)))
    if cfg.untie_embeddings_and_output_weights:
        pairs.append(Pair("lm_head.weight", OUTPUT_LAYER, "copy", (m["vocab_size"], h)))
    return pairs


def _companions(pair: Pair, m: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The extra HF tensors a fused megagpt tensor covers (k/v of 'qkv', up of 'glu'), with their shapes."""
    cfg = ModelConfig(**m)
    if pair.how == "qkv":
        kv = (cfg.query_groups * cfg.head_dim, *pair.shape[1:])
        return [(pair.hf.replace("q_proj", "k_proj"), kv), (pair.hf.replace("q_proj", "v_proj"), kv)]
    if pair.how == "glu":
        return [(pair.hf.replace("gate_proj", "up_proj"), pair.shape)]
    return []


def _interleave(t: torch.Tensor, heads: int, inverse: bool = False) -> torch.Tensor:
    """Rows of each head from rotate-half order to interleaved (row 2k <- k, 2k + 1 <- k + d/2), or back."""
    per_head = t.reshape(heads, -1, *t.shape[1:])                                     # [heads, d, ...]
    d = per_head.size(1)
    order = torch.stack((torch.arange(d // 2), torch.arange(d // 2) + d // 2), dim=1).flatten()   # [d]
    if inverse:
        order = torch.argsort(order)
    return per_head[:, order].reshape(t.shape)


# ---- the fused tensors ----------------------------------------------------------------------------------------
def _split_qkv(t: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megagpt's grouped linear_qkv rows -> HF's q, k, v (rotate-half order)."""
    g, d, per = cfg.query_groups, cfg.head_dim, cfg.num_attention_heads // cfg.query_groups
    grouped = t.reshape(g, (per + 2) * d, *t.shape[1:])                              # [G, (n/G + 2) d, ...]
    q, k, v = grouped.split([per * d, d, d], dim=1)
    q, k, v = (x.reshape(-1, *t.shape[1:]) for x in (q, k, v))                      # [n d, ...], 2 x [G d, ...]
    if cfg.rotary_interleaved:
        q, k = _interleave(q, cfg.num_attention_heads, inverse=True), _interleave(k, g, inverse=True)
    return q, k, v


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF's q, k, v -> megagpt's linear_qkv rows grouped per query group (the inverse of `_split_qkv`)."""
    g = cfg.query_groups
    if cfg.rotary_interleaved:
        q, k = _interleave(q, cfg.num_attention_heads), _interleave(k, g)
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(g, -1, *rest), k.reshape(g, -1, *rest), v.reshape(g, -1, *rest)], dim=1)
    return fused.reshape(-1, *rest)                                                  # [(n + 2G) d, ...]


def _to_hf_tensors(t: torch.Tensor, pair: Pair, m: dict) -> list[torch.Tensor]:
    """The HF tensors (pair.hf first, then its companions) of one megagpt tensor."""
    if pair.how == "qkv":
        return list(_split_qkv(t, ModelConfig(**m)))
    if pair.how == "glu":
        return list(t.chunk(2, dim=0))                                               # gate, up
    return [t]


# ---- configs ------------------------------------------------------------------------------------------------
def export_problems(m: dict) -> list[str]:
    """Why a megagpt model (ModelConfig dict) is not a Llama (empty when it is)."""
    cfg, problems = ModelConfig(**m), []
    wanted = [("position-embedding-type", cfg.position_embedding_type, "rope"), ("normalization",
              cfg.normalization, "RMSNorm"), ("swiglu", cfg.swiglu, True), ("qk-layernorm", cfg.qk_layernorm, False),
              ("rotary-percent", cfg.rotary_percent, 1.0)]
    problems += [f"--{flag} is {value}: a Llama needs {need}" for flag, value, need in wanted if value != need]
    if cfg.disable_bias_linear and cfg.add_qkv_bias:
        problems.append("--add-qkv-bias alone (Qwen2-style) has no LlamaConfig equivalent (attention_bias also "
                        "biases o_proj)")
    return problems


def hf_config(model: dict) -> Any:
    """LlamaConfig of a megagpt Llama-style ModelConfig dict."""
    from transformers import LlamaConfig

    refuse(export_problems(model), "this megagpt model cannot be written as a LlamaForCausalLM")
    cfg = ModelConfig(**model)
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.query_groups, head_dim=cfg.head_dim, hidden_act="silu",
                       max_position_embeddings=cfg.max_positions, initializer_range=cfg.init_method_std,
                       rms_norm_eps=cfg.layernorm_epsilon, tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
                       rope_parameters=_rope_parameters(cfg),
                       attention_bias=cfg.add_bias_linear, mlp_bias=cfg.add_bias_linear,
                       attention_dropout=cfg.attention_dropout, bos_token_id=None, eos_token_id=None,
                       architectures=["LlamaForCausalLM"])


def _rope_parameters(cfg: ModelConfig) -> dict:
    """Hugging Face's rope_parameters of a megagpt RoPE configuration (scaling included)."""
    theta = float(cfg.rotary_base)
    if cfg.rotary_seq_len_interpolation_factor:
        return {"rope_type": "linear", "factor": float(cfg.rotary_seq_len_interpolation_factor), "rope_theta": theta}
    if cfg.use_rope_scaling:
        return {"rope_type": "llama3", "factor": float(cfg.rope_scaling_factor), "rope_theta": theta,
                "low_freq_factor": LLAMA3_LOW_FREQ_FACTOR, "high_freq_factor": LLAMA3_HIGH_FREQ_FACTOR,
                "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT}
    return {"rope_type": "default", "rope_theta": theta}


def _rope_problems(rope: dict) -> list[str]:
    """RoPE scalings megagpt cannot represent: rope types other than default/linear/llama3, a fractional linear
    factor (Megatron's interpolation factor is an integer), llama3 constants other than Llama 3.1's."""
    kind = rope.get("rope_type", "default")
    if kind == "linear" and float(rope.get("factor", 1.0)) != int(rope.get("factor", 1.0)):
        return [f"linear RoPE factor {rope['factor']}: megagpt's --rotary-seq-len-interpolation-factor is an integer"]
    if kind == "llama3":
        want = {"low_freq_factor": LLAMA3_LOW_FREQ_FACTOR, "high_freq_factor": LLAMA3_HIGH_FREQ_FACTOR,
                "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT}
        return [f"llama3 RoPE {k}={rope.get(k)}: megagpt uses Llama 3.1's {v}" for k, v in want.items()
                if float(rope.get(k, v)) != float(v)]
    if kind not in ("default", "linear"):
        return [f"rope_type {kind!r}: megagpt implements unscaled, linear and llama3 RoPE only"]
    return []


def check_hf_config(config: Any) -> None:
    """Raise ConversionError listing every Llama option megagpt's model cannot represent."""
    get = lambda key, default=None: getattr(config, key, default)  # noqa: E731
    problems = []
    if get("model_type") != "llama":
        problems.append(f"model_type {get('model_type')!r} is not 'llama' (sliding-window, MoE and other decoders "
                        f"are not converted)")
    if get("hidden_act") != "silu":
        problems.append(f"hidden_act {get('hidden_act')!r}: megagpt's --swiglu gates with silu")
    rope = get("rope_parameters") or {}
    problems += _rope_problems(rope)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor {rope['partial_rotary_factor']}: not converted")
    heads, kv = get("num_attention_heads"), get("num_key_value_heads") or get("num_attention_heads")
    if heads and kv and heads % kv:
        problems.append(f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv}")
    if heads and get("head_dim") not in (None, get("hidden_size") // heads):
        problems.append(f"head_dim {get('head_dim')} != hidden_size / num_attention_heads: megagpt's attention "
                        f"projects to hidden_size")
    if bool(get("attention_bias")) != bool(get("mlp_bias")):
        problems.append(f"attention_bias={get('attention_bias')} with mlp_bias={get('mlp_bias')}: megagpt has biases "
                        f"on every linear or on none")
    if (get("pretraining_tp") or 1) != 1:
        problems.append(f"pretraining_tp {get('pretraining_tp')}: only 1 is converted")
    refuse(problems, "Hugging Face config cannot be represented by megagpt")


def model_config_from_hf(config: Any, make_vocab_size_divisible_by: int = 128,
                         rotary_interleaved: bool = False) -> ModelConfig:
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    rope = config.rope_parameters or {}
    kind = rope.get("rope_type", "default")
    return ModelConfig(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, num_attention_heads=heads,
                       ffn_hidden_size=config.intermediate_size, seq_length=config.max_position_embeddings,
                       max_position_embeddings=config.max_position_embeddings, vocab_size=config.vocab_size,
                       make_vocab_size_divisible_by=make_vocab_size_divisible_by, hidden_dropout=0.0,
                       attention_dropout=float(config.attention_dropout or 0.0),
                       init_method_std=config.initializer_range, layernorm_epsilon=config.rms_norm_eps,
                       position_embedding_type="rope", rotary_base=int(rope.get("rope_theta", 10000)),
                       rotary_seq_len_interpolation_factor=int(rope["factor"]) if kind == "linear" else None,
                       use_rope_scaling=kind == "llama3",
                       rope_scaling_factor=float(rope.get("factor", 8.0)) if kind == "llama3" else 8.0,
                       rotary_interleaved=rotary_interleaved, normalization="RMSNorm", swiglu=True,
                       group_query_attention=kv != heads, num_query_groups=kv if kv != heads else 1,
                       untie_embeddings_and_output_weights=not config.tie_word_embeddings,
                       disable_bias_linear=not config.attention_bias)


# ---- export and import --------------------------------------------------------------------------------------
def export_hf(checkpoint_dir: str, iteration: Optional[int] = None) -> tuple[dict[str, torch.Tensor], Any]:
    """(LlamaForCausalLM state dict, LlamaConfig) of a megagpt checkpoint in any layout (default: the latest).

    The vocabulary is trimmed to vocab_size; with tied embeddings `lm_head.weight` is `model.embed_tokens.weight`."""
    fused, model = export_weights(checkpoint_dir, iteration, _pairs, lambda t, how, m: t)
    config = hf_config(model)
    state = {}
    for pair in _pairs(model):
        names = [pair.hf] + [name for name, _ in _companions(pair, model)]
        for name, t in zip(names, _to_hf_tensors(fused[pair.hf], pair, model)):
            state[name] = t.clone(memory_format=torch.contiguous_format)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state, config


def save_hf(state: Mapping[str, torch.Tensor], config: Any, hf_dir: str) -> None:
    """`save_pretrained` into `hf_dir` (must not exist or be empty) through a temporary directory and a rename."""
    from transformers import LlamaForCausalLM

    save_pretrained(LlamaForCausalLM, state, config, hf_dir)


def read_hf_config(path: str) -> Any:
    from transformers import LlamaConfig

    return read_config(LlamaConfig, path)


def _megagpt_weights(state: Mapping[str, torch.Tensor], model: dict) -> dict[str, torch.Tensor]:
    """megagpt name -> whole (unpadded) tensor; every key, shape and the tying are checked first."""
    cfg, pairs = ModelConfig(**model), _pairs(model)
    expected = pairs + [Pair(name, "", "", shape) for p in pairs for name, shape in _companions(p, model)]
    tied_head = () if cfg.untie_embeddings_and_output_weights else ("lm_head.weight",)   # may be listed, as a copy
    problems = shape_problems(state, expected, allowed_extra=tied_head)
    emb, head = state.get("model.embed_tokens.weight"), state.get("lm_head.weight")
    if not cfg.untie_embeddings_and_output_weights and head is not None and emb is not None and \
            (head.shape != emb.shape or not torch.equal(head, emb)):
        problems.append("lm_head.weight differs from model.embed_tokens.weight but the config ties them")
    refuse(problems, "Hugging Face weights do not match the Llama config")
    out = {}
    for p in pairs:
        parts = [state[p.hf]] + [state[name] for name, _ in _companions(p, model)]
        out[p.megagpt] = (_fuse_qkv(*parts, cfg) if p.how == "qkv" else torch.cat(parts) if p.how == "glu"
                          else parts[0]).clone(memory_format=torch.contiguous_format)
    return out


def import_hf(source: Union[str, Mapping[str, torch.Tensor]], dst_dir: str, tp: int, pp: int,
              config: Any = None, num_chunks: int = 1, make_vocab_size_divisible_by: int = 128,
              rotary_interleaved: bool = False, progress: bool = False) -> str:
    """Write a HF Llama (a save_pretrained directory, or a state dict plus its LlamaConfig) as a megagpt checkpoint
    at TP x PP: iteration 0, weights only. `rotary_interleaved`: store q/k for megagpt's --rotary-interleaved
    (permuted per head; the same model). Config, layout and destination are checked before the weights are read."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make_config(hf: Any) -> Config:
        cfg = Config(model=model_config_from_hf(hf, make_vocab_size_divisible_by, rotary_interleaved))
        cfg.data.tokenizer_type = "HuggingFaceTokenizer"
        return cfg

    return import_model(source, config, (LlamaConfig, LlamaForCausalLM), check_hf_config, make_config,
                        _megagpt_weights, dst_dir, tp, pp, num_chunks, progress)
