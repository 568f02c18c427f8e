"""Hugging Face GPT-2 (`GPT2LMHeadModel`) <-> megagpt checkpoints, in any megagpt TP x PP layout.

Kept apart from convert.py (layouts) because it is the other concept: a name-and-layout mapping between two models.
megagpt's block is HF GPT-2's exactly (pre-LN, learned positions, gelu_new = tanh GELU, 4h MLP, tied head, biases
everywhere); the differences are storage only:
- HF's Conv1D stores linear weights transposed, `[in, out]`;
- HF's `c_attn` rows are `[q | k | v]` (each head-major), megagpt's `linear_qkv` groups them per head,
  `[q_h0 k_h0 v_h0 | q_h1 ...]`, so that a contiguous TP split gives each rank whole heads: a permutation;
- megagpt pads the vocabulary (`pad_vocab_size`) and masks the padding out of the logits; HF has exactly vocab rows.
So export then import is bit-exact, and logits agree over the real vocabulary. `transformers` is imported lazily;
what every HF conversion shares is hf_common's.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch

from megagpt.config import Config, ModelConfig
from megagpt.checkpoint.hf_common import (Pair, export_weights, import_model, read_config, refuse, save_pretrained,
                                          shape_problems)
from megagpt.model.gpt import WORD_EMBEDDING

# Causal-mask buffers that older transformers versions saved with the weights: not parameters.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
def _pairs(m: dict) -> list[Pair]:
    """(HF name, megagpt name, how to convert, HF shape) for every parameter of the model `m` (a ModelConfig dict).

    how: 'copy'; 'conv1d' (transpose); 'qkv' (per-head regroup, then transpose for the weight)."""
    cfg = ModelConfig(**m)
    h, f, positions = cfg.hidden_size, cfg.ffn_size, cfg.max_positions
    pairs = [("transformer.wte.weight", WORD_EMBEDDING, "copy", (m["vocab_size"], h)),
             ("transformer.wpe.weight", "embedding.position_embeddings.weight", "copy", (positions, h))]
    for i in range(m["num_layers"]):
        hf, mg = f"transformer.h.{i}.", f"decoder.layers.{i}."
        pairs += [(hf + "ln_1.weight", mg + "input_layernorm.weight", "copy", (h,)),
                  (hf + "ln_1.bias", mg + "input_layernorm.bias", "copy", (h,)),
                  (hf + "attn.c_attn.weight", mg + "self_attention.linear_qkv.weight", "qkv", (h, 3 * h)),
                  (hf + "attn.c_attn.bias", mg + "self_attention.linear_qkv.bias", "qkv", (3 * h,)),
                  (hf + "attn.c_proj.weight", mg + "self_attention.linear_proj.weight", "conv1d", (h, h)),
                  (hf + "attn.c_proj.bias", mg + "self_attention.linear_proj.bias", "copy", (h,)),
                  (hf + "ln_2.weight", mg + "pre_mlp_layernorm.weight", "copy", (h,)),
                  (hf + "ln_2.bias", mg + "pre_mlp_layernorm.bias", "copy", (h,)),
                  (hf + "mlp.c_fc.weight", mg + "mlp.linear_fc1.weight", "conv1d", (h, f)),
                  (hf + "mlp.c_fc.bias", mg + "mlp.linear_fc1.bias", "copy", (f,)),
                  (hf + "mlp.c_proj.weight", mg + "mlp.linear_fc2.weight", "conv1d", (f, h)),
                  (hf + "mlp.c_proj.bias", mg + "mlp.linear_fc2.bias", "copy", (h,))]
    pairs += [("transformer.ln_f.weight", "decoder.final_layernorm.weight", "copy", (h,)),
              ("transformer.ln_f.bias", "decoder.final_layernorm.bias", "copy", (h,))]
    return [Pair(*p) for p in pairs]


def _to_hf(t: torch.Tensor, how: str, model: dict) -> torch.Tensor:
    heads = model["num_attention_heads"]
    if how == "qkv":   # [heads, (q k v), d, ...] -> [(q k v), heads, d, ...]
        t = t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    if how in ("qkv", "conv1d") and t.dim() == 2:
        t = t.t()
    return t


def _from_hf(t: torch.Tensor, how: str, heads: int) -> torch.Tensor:
    if how in ("qkv", "conv1d") and t.dim() == 2:
        t = t.t()
    if how == "qkv":   # [(q k v), heads, d, ...] -> [heads, (q k v), d, ...]
        t = t.reshape(3, heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return t.clone(memory_format=torch.contiguous_format)


# ---- configs ------------------------------------------------------------------------------------------------
def hf_config(model: dict) -> Any:
    """GPT2Config of a megagpt ModelConfig dict (gelu_new, tied head, LayerNorm epsilon and dropouts carried)."""
    from transformers import GPT2Config

    h, ffn = model["hidden_size"], model["ffn_hidden_size"]
    eos = 50256 if model["vocab_size"] > 50256 else None   # GPT-2's <|endoftext|>, when the vocabulary has it
    return GPT2Config(vocab_size=model["vocab_size"], n_positions=ModelConfig(**model).max_positions,
                      n_embd=h, n_layer=model["num_layers"], n_head=model["num_attention_heads"],
                      n_inner=None if ffn in (None, 4 * h) else ffn, activation_function="gelu_new",
                      resid_pdrop=model["hidden_dropout"], embd_pdrop=model["hidden_dropout"],
                      attn_pdrop=model["attention_dropout"], layer_norm_epsilon=model["layernorm_epsilon"],
                      initializer_range=model["init_method_std"], tie_word_embeddings=True, scale_attn_weights=True,
                      bos_token_id=eos, eos_token_id=eos, architectures=["GPT2LMHeadModel"])


def check_hf_config(config: Any) -> None:
    """Raise ConversionError listing every GPT-2 option megagpt's model cannot represent."""
    get = lambda key, default=None: getattr(config, key, default)  # noqa: E731
    problems = []
    if get("model_type") != "gpt2":
        problems.append(f"model_type {get('model_type')!r} is not 'gpt2'")
    if get("activation_function") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {get('activation_function')!r}: megagpt uses the tanh GELU (gelu_new)")
    if not get("tie_word_embeddings", True):
        problems.append("tie_word_embeddings=False: megagpt ties the LM head to the word embedding")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if get(flag, False):
            problems.append(f"{flag}=True is not implemented by megagpt's attention")
    if not get("scale_attn_weights", True):
        problems.append("scale_attn_weights=False: megagpt always scales scores by 1/sqrt(head_dim)")
    if get("n_embd") and get("n_head") and get("n_embd") % get("n_head"):
        problems.append(f"n_embd {get('n_embd')} is not divisible by n_head {get('n_head')}")
    refuse(problems, "Hugging Face config cannot be represented by megagpt")


def model_config_from_hf(config: Any, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    h = config.n_embd
    return ModelConfig(num_layers=config.n_layer, hidden_size=h, num_attention_heads=config.n_head,
                       ffn_hidden_size=None if config.n_inner in (None, 4 * h) else config.n_inner,
                       seq_length=config.n_positions, max_position_embeddings=config.n_positions,
                       vocab_size=config.vocab_size, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                       hidden_dropout=config.resid_pdrop, attention_dropout=config.attn_pdrop,
                       init_method_std=config.initializer_range, layernorm_epsilon=config.layer_norm_epsilon)


# ---- export -------------------------------------------------------------------------------------------------
def export_hf(checkpoint_dir: str, iteration: Optional[int] = None) -> tuple[dict[str, torch.Tensor], Any]:
    """(GPT2LMHeadModel state dict, GPT2Config) of a megagpt checkpoint in any layout (default: latest iteration).

    The vocabulary is trimmed to vocab_size; `lm_head.weight` is the same tensor as `transformer.wte.weight`."""
    state, model = export_weights(checkpoint_dir, iteration, _pairs, _to_hf)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state, hf_config(model)


def save_hf(state: Mapping[str, torch.Tensor], config: Any, hf_dir: str) -> None:
    """`save_pretrained` into `hf_dir` (must not exist or be empty) through a temporary directory and a rename."""
    from transformers import GPT2LMHeadModel

    save_pretrained(GPT2LMHeadModel, state, config, hf_dir)


# ---- import -------------------------------------------------------------------------------------------------
def read_hf_config(path: str) -> Any:
    """GPT2Config of a save_pretrained directory (clear error when it is not one)."""
    from transformers import GPT2Config

    return read_config(GPT2Config, path)


def _normalise_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel names: `transformer.` added where a GPT2Model-style dict lacks it, mask buffers dropped."""
    out = {}
    for key, t in state.items():
        if key.endswith(_HF_BUFFERS):
            continue
        out[key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key] = t
    return out


def _megagpt_weights(state: Mapping[str, torch.Tensor], model: dict) -> dict[str, torch.Tensor]:
    """megagpt name -> whole (unpadded) tensor; every key, shape and the tying are checked first."""
    state = _normalise_keys(state)
    pairs = _pairs(model)
    problems = shape_problems(state, pairs, allowed_extra=("lm_head.weight",))
    wte = state.get("transformer.wte.weight")
    if wte is not None and wte.shape[0] != model["vocab_size"]:
        problems.insert(0, f"vocab mismatch: transformer.wte.weight has {wte.shape[0]} rows, "
                           f"config vocab_size is {model['vocab_size']}")
    head = state.get("lm_head.weight")
    if head is not None and wte is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
        problems.append("lm_head.weight differs from transformer.wte.weight: megagpt ties them (untied model)")
    refuse(problems, "Hugging Face weights do not match a GPT-2 megagpt can load")
    return {p.megagpt: _from_hf(state[p.hf], p.how, model["num_attention_heads"]) for p in pairs}


def import_hf(source: Union[str, Mapping[str, torch.Tensor]], dst_dir: str, tp: int, pp: int,
              config: Any = None, num_chunks: int = 1, make_vocab_size_divisible_by: int = 128,
              progress: bool = False) -> str:
    """Write a HF GPT-2 (a save_pretrained directory, or a state dict plus its GPT2Config) as a megagpt checkpoint
    at TP x PP: iteration 0, weights only (training starts with a fresh optimizer, as Megatron's --finetune).

    Config, layout and destination are checked before the weights are read. Returns the iteration directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def make_config(hf: Any) -> Config:
        cfg = Config(model=model_config_from_hf(hf, make_vocab_size_divisible_by))
        cfg.data.tokenizer_type = "GPT2BPETokenizer" if cfg.model.vocab_size == 50257 else "HuggingFaceTokenizer"
        return cfg

    return import_model(source, config, (GPT2Config, GPT2LMHeadModel), check_hf_config, make_config,
                        _megagpt_weights, dst_dir, tp, pp, num_chunks, progress)
