"""Hugging Face GPT-2 (`GPT2LMHeadModel`) <-> megagpt checkpoints, in any megagpt TP x PP layout.

Kept apart from convert.py (layouts) because it is the other concept: a name-and-layout mapping between two models.
megagpt's block is HF GPT-2's exactly (pre-LN, learned positions, gelu_new = tanh GELU, 4h MLP, tied head, biases
everywhere); the differences are storage only:
- HF's Conv1D stores linear weights transposed, `[in, out]`;
- HF's `c_attn` rows are `[q | k | v]` (each head-major), megagpt's `linear_qkv` groups them per head,
  `[q_h0 k_h0 v_h0 | q_h1 ...]`, so that a contiguous TP split gives each rank whole heads: a permutation;
- megagpt pads the vocabulary (`pad_vocab_size`) and masks the padding out of the logits; HF has exactly vocab rows.
So export then import is bit-exact, and logits agree over the real vocabulary. `transformers` is imported lazily.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import torch

from megagpt.config import Config, ModelConfig
from megagpt.checkpoint.convert import (ConversionError, ShardedCheckpoint, check_destination, check_target_layout,
                                        write_checkpoint)
from megagpt.fileio import write_directory_atomically
from megagpt.model.gpt import WORD_EMBEDDING

# Causal-mask buffers that older transformers versions saved with the weights: not parameters.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
# megagpt TP split dims by name suffix (0 column / vocab rows, 1 row-parallel input); others are replicated.
_SPLIT_DIMS = {"word_embeddings.weight": 0, "linear_qkv.weight": 0, "linear_qkv.bias": 0, "linear_fc1.weight": 0,
               "linear_fc1.bias": 0, "linear_proj.weight": 1, "linear_fc2.weight": 1}


def split_dim(name: str) -> Optional[int]:
    """TP split dim of a megagpt parameter (what metadata.json records for it)."""
    return _SPLIT_DIMS.get(".".join(name.split(".")[-2:]))


def _pairs(m: dict) -> list[tuple[str, str, str, tuple[int, ...]]]:
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
    return pairs


def _to_hf(t: torch.Tensor, how: str, heads: int) -> torch.Tensor:
    if how == "qkv":   # [heads, (q k v), d, ...] -> [(q k v), heads, d, ...]
        t = t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    if how in ("qkv", "conv1d") and t.dim() == 2:
        t = t.t()
    return t.clone(memory_format=torch.contiguous_format)


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
    if problems:
        raise ConversionError("Hugging Face config cannot be represented by megagpt:\n  - " + "\n  - ".join(problems))


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
    source = ShardedCheckpoint(checkpoint_dir, iteration)
    model = source.meta["config"]["model"]
    config = hf_config(model)
    state = {}
    for hf_name, name, how, _ in _pairs(model):
        t = source.weight(name)
        state[hf_name] = _to_hf(t[:model["vocab_size"]] if name == WORD_EMBEDDING else t, how,
                                model["num_attention_heads"])
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state, config


def save_hf(state: Mapping[str, torch.Tensor], config: Any, hf_dir: str) -> None:
    """`save_pretrained` into `hf_dir` (must not exist or be empty) through a temporary directory and a rename."""
    from transformers import GPT2LMHeadModel

    check_destination(hf_dir)

    def write(tmp: str) -> None:
        with torch.device("meta"):                 # no random init of weights that are replaced at once
            model = GPT2LMHeadModel(config)
        model.load_state_dict(dict(state), strict=True, assign=True)
        model.tie_weights()
        model.save_pretrained(tmp)

    write_directory_atomically(hf_dir, write)


# ---- import -------------------------------------------------------------------------------------------------
def read_hf_config(path: str) -> Any:
    """GPT2Config of a save_pretrained directory (clear error when it is not one)."""
    from transformers import GPT2Config

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConversionError(f"{path!r} is not a Hugging Face model directory (no config.json)")
    return GPT2Config.from_pretrained(path, local_files_only=True)


def _read_hf_weights(path: str, config: Any) -> dict[str, torch.Tensor]:
    """from_pretrained, offline: reads safetensors or .bin, sharded or not, with or without the `transformer.` prefix."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(path, config=config, local_files_only=True).state_dict()


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
    expected = {hf: shape for hf, _, _, shape in pairs}
    problems = [f"unexpected tensor {k}" for k in state if k not in expected and k != "lm_head.weight"]
    problems += [f"missing tensor {k}" for k in expected if k not in state]
    problems += [f"{k} has shape {list(state[k].shape)}, the config implies {list(shape)}"
                 for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape]
    wte = state.get("transformer.wte.weight")
    if wte is not None and wte.shape[0] != model["vocab_size"]:
        problems.insert(0, f"vocab mismatch: transformer.wte.weight has {wte.shape[0]} rows, "
                           f"config vocab_size is {model['vocab_size']}")
    head = state.get("lm_head.weight")
    if head is not None and wte is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
        problems.append("lm_head.weight differs from transformer.wte.weight: megagpt ties them (untied model)")
    if problems:
        raise ConversionError("Hugging Face weights do not match a GPT-2 megagpt can load:\n  - "
                              + "\n  - ".join(problems))
    return {name: _from_hf(state[hf], how, model["num_attention_heads"]) for hf, name, how, _ in pairs}


class _InMemory:
    """A convert.Source over whole tensors held in memory (an imported model has no optimizer state)."""

    def __init__(self, meta: dict, weights: dict[str, torch.Tensor]) -> None:
        self.meta, self._weights = meta, weights

    def weight(self, name: str) -> torch.Tensor:
        return self._weights[name]

    def optimizer_entry(self, name: str) -> None:
        return None

    def optimizer_common(self) -> None:
        return None

    def scheduler(self) -> None:
        return None


def import_hf(source: Union[str, Mapping[str, torch.Tensor]], dst_dir: str, tp: int, pp: int,
              config: Any = None, num_chunks: int = 1, make_vocab_size_divisible_by: int = 128,
              progress: bool = False) -> str:
    """Write a HF GPT-2 (a save_pretrained directory, or a state dict plus its GPT2Config) as a megagpt checkpoint
    at TP x PP: iteration 0, weights only (training starts with a fresh optimizer, as Megatron's --finetune).

    Config, layout and destination are checked before the weights are read. Returns the iteration directory."""
    from_dir = isinstance(source, (str, os.PathLike))
    if from_dir:
        config = read_hf_config(os.fspath(source))
    elif config is None:
        raise ConversionError("import_hf of a state dict needs its GPT2Config (config=...)")
    check_hf_config(config)
    model = model_config_from_hf(config, make_vocab_size_divisible_by)
    cfg = Config(model=model)
    cfg.data.tokenizer_type = "GPT2BPETokenizer" if model.vocab_size == 50257 else "HuggingFaceTokenizer"
    check_target_layout(cfg.to_dict()["model"], tp, pp, num_chunks)
    check_destination(dst_dir)
    state = _read_hf_weights(os.fspath(source), config) if from_dir else source
    weights = _megagpt_weights(state, cfg.to_dict()["model"])
    meta = {"iteration": 0, "consumed_samples": 0, "config": cfg.to_dict(), "tokenizer_type": cfg.data.tokenizer_type,
            "converted_from": {"hugging_face": getattr(config, "_name_or_path", "") or "GPT2LMHeadModel"},
            "tensors": {n: {"shape": list(t.shape), "split_dim": split_dim(n),
                            "dtype": str(t.dtype).replace("torch.", "")} for n, t in weights.items()}}
    return write_checkpoint(_InMemory(meta, weights), dst_dir, tp, pp, num_chunks, progress)
