"""Checkpoint conversion between parallel layouts (TP, PP, virtual chunks); the library behind
tools/convert_checkpoint.py. Hugging Face GPT-2 import/export (hf_gpt2.py) writes through the same `write_checkpoint`.

Reading: shard files are memory-mapped and each tensor is assembled at full size from its TP shards on demand
(metadata.json names its split dim), so the source model is never held in memory as a whole. Writing goes one
target pipeline stage at a time: peak memory is about one stage's weights and optimizer state.

What a converted checkpoint holds (layout `data_parallel_size: null`, see sharded.py):
- every chunk's weights, bit-exact copies; the vocabulary is trimmed to `vocab_size` and re-padded with zero rows
  for the target TP (`pad_vocab_size`); the last stage's tied copy `output_layer.weight` exists iff target PP > 1
  (an untied output layer, `--untie-embeddings-and-output-weights`, always: it is a weight of its own);
- model variants: grouped-query QKV rows are grouped per query group, so a contiguous split still gives each rank
  whole groups (the target TP must divide the groups); SwiGLU's fc1 shards are each `[gate_r | up_r]`, so they are
  merged to `[gate | up]` and re-split per gate/up half (model.transformer.glu_*_order);
- the optimizer state per parameter at whole size (fp32 masters, Adam moments, step), split like its parameter.
  ZeRO sources are merged from their `distrib_optim_dp*.pt` shards; the target is unsharded over DP and
  `sharded.load_checkpoint` cuts it to any DP size, ZeRO included, when a run loads it;
- iteration, consumed samples, LR-scheduler and loss-scaler state, so training resumes where it stopped;
- no RNG states: the dropout streams are per (TP, PP) rank and mean nothing in another layout, so the loading run
  keeps its freshly seeded ones (Megatron's --no-load-rng).
"""
from __future__ import annotations

import copy
import json
import os
from collections import defaultdict
from typing import Any, Iterable, Optional, Protocol

import torch
from tqdm import tqdm

from megagpt.checkpoint.format import (FORMAT_VERSION, METADATA_FILE, MODEL_FILE, TRACKER_FILE, CheckpointError,
                                       is_converted, iteration_dir, model_key, read_metadata, shard_dir,
                                       zero_shard_file)
from megagpt.checkpoint.integrity import digests_under
from megagpt.config import ModelConfig, layout_problems, pad_vocab_size, variant_problems
from megagpt.fileio import atomic_torch_save, atomic_write_text, new_directory_problem, write_directory_atomically
from megagpt.model.gpt import OUTPUT_LAYER, WORD_EMBEDDING, stage_layer_ids
from megagpt.model.transformer import glu_canonical_order, glu_tp_order, is_glu_fc1
from megagpt.config import stage_of



class ConversionError(CheckpointError):
    """Input that cannot be converted (missing files, a layout the model cannot take, unknown tensors)."""


class Source(Protocol):
    """What `write_checkpoint` reads: metadata plus whole (TP-gathered) tensors, one at a time."""

    meta: dict          # iteration, consumed_samples, config, tokenizer_type, tensors (name -> shape, split_dim)

    def weight(self, name: str) -> torch.Tensor: ...

    def optimizer_entry(self, name: str) -> Optional[dict]: ...

    def optimizer_common(self) -> Optional[dict]: ...   # param_groups, grad_scaler, skipped_iterations

    def scheduler(self) -> Optional[dict]: ...


# ---- layout arithmetic --------------------------------------------------------------------------------------
def check_target_layout(model: dict, tp: int, pp: int, chunks: int = 1) -> None:
    """Raise ConversionError naming the numbers when the model cannot be split TP x PP (x virtual chunks)."""
    cfg = ModelConfig(**model)
    problems = layout_problems(tp, pp, num_attention_heads=model["num_attention_heads"], num_layers=model["num_layers"],
                               ffn_size=cfg.ffn_size, virtual_chunks=chunks, what="target ")
    problems += variant_problems(cfg, tp, what="target ")
    if problems:
        raise ConversionError("cannot convert to this layout:\n  - " + "\n  - ".join(problems))


def is_vocab_tensor(name: str, info: dict) -> bool:
    """The word embedding, its tied copy and an untied output layer: rows = padded vocabulary."""
    return name in (WORD_EMBEDDING, OUTPUT_LAYER) or info.get("tied_to") == WORD_EMBEDDING


def place(name: str, num_layers: int, pp: int, chunks: int, v_shape: bool = False) -> tuple[int, int]:
    """(pp rank, chunk) that owns tensor `name` in a TP x PP x chunks layout (as gpt.build_model_chunks builds it,
    with the V placement of zb-v when `v_shape`). Conversion writes the interleaved placement (v_shape False);
    a zb-v source is read through the pp rank and chunk its metadata records for every tensor."""
    if name.startswith("embedding."):
        return stage_of(0, pp, chunks, v_shape)
    if name.startswith("decoder.final_layernorm.") or name == OUTPUT_LAYER:
        return stage_of(pp * chunks - 1, pp, chunks, v_shape)
    if name.startswith("decoder.layers."):
        layer = int(name.split(".")[2])
        for p in range(pp):
            for c in range(chunks):
                if layer in stage_layer_ids(num_layers, pp, p, chunks, c, v_shape):
                    return p, c
    raise ConversionError(f"tensor {name!r} is not part of the GPT model this converter knows (no stage for it)")


def fit_vocab(t: torch.Tensor, vocab: int, padded: int) -> torch.Tensor:
    """Rows [0, vocab) of a vocabulary tensor followed by zero rows up to `padded` (a new tensor when padding)."""
    t = t[:vocab]
    if padded == vocab:
        return t
    return torch.cat([t, t.new_zeros((padded - vocab, *t.shape[1:]))])


def _split(t: torch.Tensor, split_dim: Optional[int], tp: int, glu: bool = False) -> list[torch.Tensor]:
    """TP parts as tensors with their own storage (torch.save of a view would write the whole storage); `glu`:
    SwiGLU's fc1 rows `[gate | up]`, each part getting its matching gate and up halves."""
    if glu and split_dim is not None:
        t = glu_tp_order(t, tp)
    parts = [t] * tp if split_dim is None else list(t.chunk(tp, dim=split_dim))
    return [p.clone(memory_format=torch.contiguous_format) for p in parts]


def _merge(parts: list[torch.Tensor], split_dim: Optional[int], glu: bool = False) -> torch.Tensor:
    """The whole tensor of TP parts (the inverse of `_split`)."""
    if split_dim is None:
        return parts[0]
    whole = torch.cat(parts, dim=split_dim)
    return glu_canonical_order(whole, len(parts)) if glu else whole


# ---- reading a sharded checkpoint ---------------------------------------------------------------------------
class ShardedCheckpoint:
    """A saved checkpoint (any layout, ZeRO or not) read as whole tensors, one at a time, from memory-mapped files.

    Every file the checkpoint needs is checked to exist on construction, before any tensor is read."""

    def __init__(self, directory: str, iteration: Optional[int] = None) -> None:
        self.directory = directory
        self.meta = read_metadata(directory, iteration)
        self.iteration = self.meta["iteration"]
        layout = self.meta["layout"]
        self.tp, self.pp = layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"]
        self.chunks = layout["virtual_pipeline_chunks"]
        self.model = ModelConfig(**self.meta["config"]["model"])
        # ZeRO shards exist unless the run saved no optimizer state (--no-save-optim)
        self.zero = layout["use_distributed_optimizer"] and not is_converted(layout) and \
            self.meta.get("has_optimizer", True)
        self.dp = layout["data_parallel_size"]
        self._files: dict[str, dict] = {}
        self._zero_index: dict[tuple[int, int], dict] = {}
        self._check()

    def _path(self, tp: int, pp: int, name: str = MODEL_FILE) -> str:
        return os.path.join(shard_dir(self.directory, self.iteration, tp, pp), name)

    def _check(self) -> None:
        model = self.meta["config"]["model"]
        emb = self.meta["tensors"].get(WORD_EMBEDDING)
        if emb is None:
            raise ConversionError(f"{self.directory}: metadata.json lists no {WORD_EMBEDDING}")
        padded = pad_vocab_size(model["vocab_size"], self.tp, model["make_vocab_size_divisible_by"])
        if emb["shape"][0] != padded:
            raise ConversionError(f"vocab mismatch in {self.directory}: {WORD_EMBEDDING} has {emb['shape'][0]} rows "
                                  f"but vocab_size {model['vocab_size']} pads to {padded} at TP={self.tp}")
        names = [MODEL_FILE] + ([os.path.basename(zero_shard_file("", d)) for d in range(self.dp)] if self.zero else [])
        missing = [self._path(t, p, n) for t in range(self.tp) for p in range(self.pp) for n in names
                   if not os.path.isfile(self._path(t, p, n))]
        if missing:
            raise ConversionError(f"checkpoint of iteration {self.iteration} in {self.directory!r} is incomplete; "
                                  f"missing: {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))

    def _load(self, path: str) -> dict:
        if path not in self._files:   # mmap: tensors are paged in when read, not loaded up front
            self._files[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        return self._files[path]

    def _local_shape(self, name: str) -> list[int]:
        info = self.meta["tensors"][name]
        shape = list(info["shape"])
        if info["split_dim"] is not None:
            shape[info["split_dim"]] //= self.tp
        return shape

    def weight(self, name: str) -> torch.Tensor:
        info = self.meta["tensors"][name]
        key = model_key(info["chunk"], self.chunks)
        parts = [self._load(self._path(t, info["pp_rank"]))[key][name] for t in range(self.tp)]
        return _merge(parts, info["split_dim"], is_glu_fc1(name, self.model))

    def optimizer_entry(self, name: str) -> Optional[dict]:
        info = self.meta["tensors"][name]
        parts = [self._local_optimizer_entry(t, info["pp_rank"], name) for t in range(self.tp)]
        if parts[0] is None:
            return None
        return {k: v if v.dim() == 0 else _merge([p[k] for p in parts], info["split_dim"], is_glu_fc1(name, self.model))
                for k, v in parts[0].items()}

    def _local_optimizer_entry(self, tp: int, pp: int, name: str) -> Optional[dict]:
        """Masters and moments of one TP shard of `name`, at the shard's shape (ZeRO slices concatenated)."""
        state = self._load(self._path(tp, pp))
        if "optimizer" in state:
            return state["optimizer"]["optimizer"]["param_state"][name]
        if not self.zero:
            return None
        pieces = self._zero_pieces(tp, pp)[name]
        shape, expected = self._local_shape(name), 0
        for start, end, _ in pieces:
            if start != expected:
                raise ConversionError(f"ZeRO shards of {name!r} (tp {tp}, pp {pp}) do not tile it: gap at {expected}")
            expected = end
        entry = {}
        for k, v in pieces[0][2].items():
            entry[k] = v if v.dim() == 0 else torch.cat([p[2][k].reshape(-1) for p in pieces]).view(shape)
        return entry

    def _zero_pieces(self, tp: int, pp: int) -> dict[str, list]:
        """name -> [(start, end, state slice)] over the DP shards of (tp, pp), sorted by start."""
        if (tp, pp) not in self._zero_index:
            index = defaultdict(list)
            for d in range(self.dp):
                optim = self._load(zero_shard_file(shard_dir(self.directory, self.iteration, tp, pp), d))["optimizer"]["optimizer"]
                for name, where in optim["shard_layout"].items():
                    index[name].append((where["start"], where["end"], optim["param_state"][name]))
            self._zero_index[(tp, pp)] = {n: sorted(p, key=lambda x: x[0]) for n, p in index.items()}
        return self._zero_index[(tp, pp)]

    def _first_optimizer(self) -> Optional[dict]:
        state = self._load(self._path(0, 0))
        if "optimizer" in state:
            return state["optimizer"]["optimizer"]
        if not self.zero:
            return None
        return self._load(zero_shard_file(shard_dir(self.directory, self.iteration, 0, 0), 0))["optimizer"]["optimizer"]

    def optimizer_common(self) -> Optional[dict]:
        optim = self._first_optimizer()
        if optim is None:
            return None
        return {k: optim[k] for k in ("param_groups", "grad_scaler", "skipped_iterations") if k in optim}

    def scheduler(self) -> Optional[dict]:
        return self._load(self._path(0, 0)).get("opt_param_scheduler")


# ---- writing ------------------------------------------------------------------------------------------------
def target_tensors(meta: dict, tp: int, pp: int, chunks: int) -> dict[str, dict]:
    """metadata.json `tensors` of the target layout, each with `source`: the name to read it from."""
    model = meta["config"]["model"]
    padded = pad_vocab_size(model["vocab_size"], tp, model["make_vocab_size_divisible_by"])
    untied = ModelConfig(**model).untie_embeddings_and_output_weights
    names = [n for n in meta["tensors"] if n != OUTPUT_LAYER] + ([OUTPUT_LAYER] if pp > 1 or untied else [])
    out = {}
    for name in names:
        source = name if name in meta["tensors"] else WORD_EMBEDDING    # the tied copy, new under PP > 1
        info = {k: v for k, v in meta["tensors"][source].items() if k not in ("pp_rank", "chunk", "tied_to")}
        if name == OUTPUT_LAYER and not untied:
            info["tied_to"] = WORD_EMBEDDING
        if is_vocab_tensor(name, info):
            info["shape"] = [padded, *info["shape"][1:]]
        info["pp_rank"], info["chunk"] = place(name, model["num_layers"], pp, chunks)
        out[name] = {**info, "source": source}
    return out


def target_config(config: dict, tp: int, pp: int, chunks: int) -> dict:
    """The saved config with the target's parallel sizes."""
    config = copy.deepcopy(config)
    par = config["parallel"]
    par["tensor_model_parallel_size"], par["pipeline_model_parallel_size"] = tp, pp
    par["num_layers_per_virtual_pipeline_stage"] = config["model"]["num_layers"] // (pp * chunks) if chunks > 1 \
        else None
    # The target has the interleaved placement: a schedule that places chunks otherwise (zb-v) or needs another
    # chunk count does not carry over (None: 1F1B or interleaved, from the sizes above).
    if par.get("pipeline_schedule") not in ({"1f1b", "zb-h1"} if chunks == 1 else {"interleaved"}):
        par["pipeline_schedule"] = None
    return config


def check_destination(dst_dir: str) -> None:
    """Outputs go to a directory that does not exist or is empty: never merged into, never overwritten."""
    problem = new_directory_problem(dst_dir)
    if problem:
        raise ConversionError(problem)


def write_checkpoint(source: Source, dst_dir: str, tp: int, pp: int, chunks: int = 1,
                     progress: bool = False) -> str:
    """Write `source` as a converted checkpoint at TP x PP (x virtual chunks) into `dst_dir`, atomically.

    Returns the iteration directory. `dst_dir` must not exist or be empty."""
    meta = source.meta
    model = meta["config"]["model"]
    check_target_layout(model, tp, pp, chunks)
    plan = target_tensors(meta, tp, pp, chunks)

    def write(tmp: str) -> None:
        common = source.optimizer_common()
        bar = tqdm(total=len(plan), desc="converting tensors", unit="tensor", disable=not progress)
        for p in range(pp):
            names = [n for n, info in plan.items() if info["pp_rank"] == p]
            shards = _build_stage(source, plan, names, model, tp, chunks, common is not None, bar)
            for t, (weights, optim) in enumerate(shards):
                _save_shard(tmp, meta, t, p, tp, pp, chunks, weights, optim, common, source.scheduler())
        bar.close()
        _save_metadata(tmp, meta, plan, tp, pp, chunks)
        atomic_write_text(f"{meta['iteration']}\n", os.path.join(tmp, TRACKER_FILE))

    write_directory_atomically(dst_dir, write)
    return iteration_dir(dst_dir, meta["iteration"])


def _build_stage(source: Source, plan: dict, names: Iterable[str], model: dict, tp: int, chunks: int,
                 with_optimizer: bool, bar) -> list[tuple[dict, dict]]:
    """Per target TP rank of one stage: ({chunk key: state dict}, {name: optimizer entry})."""
    vocab, cfg = model["vocab_size"], ModelConfig(**model)
    shards = [({model_key(c, chunks): {} for c in range(chunks)}, {}) for _ in range(tp)]
    for name in names:
        info = plan[name]
        fit = (lambda t: fit_vocab(t, vocab, info["shape"][0])) if is_vocab_tensor(name, info) else (lambda t: t)
        key = model_key(info["chunk"], chunks)
        glu = is_glu_fc1(name, cfg)
        for t, part in enumerate(_split(fit(source.weight(info["source"])), info["split_dim"], tp, glu)):
            shards[t][0][key][name] = part
        entry = source.optimizer_entry(info["source"]) if with_optimizer else None
        if with_optimizer and entry is None:
            raise ConversionError(f"source has optimizer state but none for {info['source']!r}")
        for k, v in (entry or {}).items():
            parts = [v.clone()] * tp if v.dim() == 0 else _split(fit(v), info["split_dim"], tp, glu)
            for t, part in enumerate(parts):
                shards[t][1].setdefault(name, {})[k] = part
        bar.update(1)
    return shards


def _save_shard(tmp: str, meta: dict, t: int, p: int, tp: int, pp: int, chunks: int, weights: dict,
                optim: dict, common: Optional[dict], scheduler: Optional[dict]) -> None:
    folder = shard_dir(tmp, meta["iteration"], t, p)
    os.makedirs(folder, exist_ok=True)
    state: dict[str, Any] = {"iteration": meta["iteration"], "consumed_samples": meta["consumed_samples"],
                             "checkpoint_version": FORMAT_VERSION, "config": target_config(meta["config"], tp, pp, chunks),
                             "layout": converted_layout(tp, pp, chunks), **weights}
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler
    if common is not None:
        params = {n: p for chunk in weights.values() for n, p in chunk.items()}
        layout = {n: {"shape": list(params[n].shape), "start": 0, "end": params[n].numel()} for n in optim}
        state["optimizer"] = {"optimizer": {"param_state": optim, "shard_layout": layout, **common},
                              "scheduler": scheduler}
    atomic_torch_save(state, os.path.join(folder, MODEL_FILE))


def converted_layout(tp: int, pp: int, chunks: int) -> dict:
    """Layout of a converted checkpoint: any DP size, optimizer state unsharded (sharded.is_converted)."""
    return {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "data_parallel_size": None,
            "virtual_pipeline_chunks": chunks, "use_distributed_optimizer": False}


def _save_metadata(tmp: str, meta: dict, plan: dict, tp: int, pp: int, chunks: int) -> None:
    model = meta["config"]["model"]
    out = {"format_version": FORMAT_VERSION, "iteration": meta["iteration"],
           "consumed_samples": meta["consumed_samples"], "layout": converted_layout(tp, pp, chunks),
           "tokenizer_type": meta.get("tokenizer_type"),
           "padded_vocab_size": pad_vocab_size(model["vocab_size"], tp, model["make_vocab_size_divisible_by"]),
           "config": target_config(meta["config"], tp, pp, chunks),
           "tensors": {n: {k: v for k, v in info.items() if k != "source"} for n, info in plan.items()},
           "converted_from": meta.get("converted_from") or {"layout": meta.get("layout")}}
    folder = iteration_dir(tmp, meta["iteration"])
    out["files"] = digests_under(folder)     # every shard is written by now
    atomic_write_text(json.dumps(out, indent=1, sort_keys=True), os.path.join(folder, METADATA_FILE))


def reshard(src_dir: str, dst_dir: str, tp: int, pp: int, iteration: Optional[int] = None,
            num_chunks: int = 1, progress: bool = False) -> str:
    """Write the checkpoint of `src_dir` (default: its latest iteration) at another TP x PP (x virtual chunks).

    Weights and optimizer state are carried exactly (see the module docstring); returns the iteration directory.
    Every check (metadata, files, divisibility, destination) runs before any tensor is read."""
    source = ShardedCheckpoint(src_dir, iteration)
    check_target_layout(source.meta["config"]["model"], tp, pp, num_chunks)
    check_destination(dst_dir)
    return write_checkpoint(source, dst_dir, tp, pp, num_chunks, progress)
