"""What every Hugging Face import/export shares (hf_gpt2.py, hf_llama.py): reading a save_pretrained directory
offline, writing one atomically, checking a state dict against the names and shapes a config implies, and turning
whole tensors into a megagpt checkpoint at any TP x PP. Each model file keeps only its name-and-layout mapping.

A mapping is a list of `Pair(hf_name, megagpt_name, how, hf_shape)`: `how` names the model file's conversion of
that tensor (its `to_hf` / `from_hf` functions take it). `transformers` is imported lazily.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import torch

from megagpt.checkpoint.convert import (ConversionError, ShardedCheckpoint, check_destination, check_target_layout,
                                        write_checkpoint)
from megagpt.config import Config
from megagpt.fileio import write_directory_atomically
from megagpt.model.gpt import OUTPUT_LAYER, WORD_EMBEDDING

# megagpt TP split dims by name suffix (0 column / vocab rows, 1 row-parallel input); others are replicated.
_SPLIT_DIMS = {"word_embeddings.weight": 0, "linear_qkv.weight": 0, "linear_qkv.bias": 0, "linear_fc1.weight": 0,
               "linear_fc1.bias": 0, "linear_proj.weight": 1, "linear_fc2.weight": 1, OUTPUT_LAYER: 0}


class Pair(NamedTuple):
    hf: str
    megagpt: str
    how: str
    shape: tuple[int, ...]


def split_dim(name: str) -> Optional[int]:
    """TP split dim of a megagpt parameter (what metadata.json records for it)."""
    return _SPLIT_DIMS.get(name, _SPLIT_DIMS.get(".".join(name.split(".")[-2:])))


def refuse(problems: list[str], what: str) -> None:
    """One ConversionError listing every problem (nothing when there is none)."""
    if problems:
        raise ConversionError(f"{what}:\n  - " + "\n  - ".join(problems))


# ---- export -------------------------------------------------------------------------------------------------
def export_weights(checkpoint_dir: str, iteration: Optional[int], pairs_of: Callable[[dict], list[Pair]],
                   to_hf: Callable[[torch.Tensor, str, dict], torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """(HF state dict, megagpt model dict) of a checkpoint in any layout; vocabulary tensors trimmed to vocab_size."""
    source = ShardedCheckpoint(checkpoint_dir, iteration)
    model = source.meta["config"]["model"]
    state = {}
    for pair in pairs_of(model):
        t = source.weight(pair.megagpt)
        if pair.megagpt in (WORD_EMBEDDING, OUTPUT_LAYER):
            t = t[:model["vocab_size"]]
        state[pair.hf] = to_hf(t, pair.how, model).clone(memory_format=torch.contiguous_format)
    return state, model


def save_pretrained(model_class: Any, state: Mapping[str, torch.Tensor], config: Any, hf_dir: str) -> None:
    """`save_pretrained` into `hf_dir` (must not exist or be empty) through a temporary directory and a rename."""
    check_destination(hf_dir)

    def write(tmp: str) -> None:
        with torch.device("meta"):                 # no random init of weights that are replaced at once
            model = model_class(config)
        model.load_state_dict(dict(state), strict=True, assign=True)
        model.tie_weights()
        model.save_pretrained(tmp)

    write_directory_atomically(hf_dir, write)


# ---- import -------------------------------------------------------------------------------------------------
def read_config(config_class: Any, path: str) -> Any:
    """The config of a save_pretrained directory (clear error when it is not one)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConversionError(f"{path!r} is not a Hugging Face model directory (no config.json)")
    return config_class.from_pretrained(path, local_files_only=True)


def read_weights(model_class: Any, path: str, config: Any) -> dict[str, torch.Tensor]:
    """from_pretrained, offline: reads safetensors or .bin, sharded or not."""
    return model_class.from_pretrained(path, config=config, local_files_only=True).state_dict()


def shape_problems(state: Mapping[str, torch.Tensor], pairs: list[Pair], allowed_extra: tuple[str, ...] = ()
                   ) -> list[str]:
    """Unexpected, missing and mis-shaped tensors of `state` against the mapping."""
    expected = {p.hf: p.shape for p in pairs}
    problems = [f"unexpected tensor {k}" for k in state if k not in expected and k not in allowed_extra]
    problems += [f"missing tensor {k}" for k in expected if k not in state]
    problems += [f"{k} has shape {list(state[k].shape)}, the config implies {list(shape)}"
                 for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape]
    return problems


class InMemorySource:
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


def import_model(source: Union[str, Mapping[str, torch.Tensor]], config: Any, classes: tuple[Any, Any],
                 check: Callable[[Any], None], make_config: Callable[[Any], Config],
                 to_megagpt: Callable[[Mapping[str, torch.Tensor], dict], dict[str, torch.Tensor]], dst_dir: str,
                 tp: int, pp: int, num_chunks: int, progress: bool) -> str:
    """Write a HF model (a save_pretrained directory, or a state dict plus its config) as a megagpt checkpoint at
    TP x PP: iteration 0, weights only (training starts with a fresh optimizer, as Megatron's --finetune).

    `classes` = (HF config class, HF model class); `check` refuses configs megagpt cannot represent, `make_config`
    builds megagpt's Config, `to_megagpt` maps the state dict. Config, layout and destination are checked before
    the weights are read. Returns the iteration directory."""
    config_class, model_class = classes
    from_dir = isinstance(source, (str, os.PathLike))
    if from_dir:
        config = read_config(config_class, os.fspath(source))
    elif config is None:
        raise ConversionError(f"import_hf of a state dict needs its {config_class.__name__} (config=...)")
    check(config)
    cfg = make_config(config)
    check_target_layout(cfg.to_dict()["model"], tp, pp, num_chunks)
    check_destination(dst_dir)
    state = read_weights(model_class, os.fspath(source), config) if from_dir else source
    weights = to_megagpt(state, cfg.to_dict()["model"])
    meta = {"iteration": 0, "consumed_samples": 0, "config": cfg.to_dict(), "tokenizer_type": cfg.data.tokenizer_type,
            "converted_from": {"hugging_face": getattr(config, "_name_or_path", "") or model_class.__name__},
            "tensors": {n: {"shape": list(t.shape), "split_dim": split_dim(n),
                            "dtype": str(t.dtype).replace("torch.", "")} for n, t in weights.items()}}
    return write_checkpoint(InMemorySource(meta, weights), dst_dir, tp, pp, num_chunks, progress)
