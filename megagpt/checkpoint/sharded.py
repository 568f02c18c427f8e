"""Sharded checkpoints in Megatron's legacy layout: per-rank shards, atomic writes, exact resume.

File names and layout metadata are format.py's (the layout is drawn there).
RNG states differ on every rank (the dropout streams depend on TP and PP rank, and the default generator has
drawn differently once data loaders exist), so each rank keeps its own small `rng_dp*.pt` in its (tp, pp) folder
instead of Megatron's DP-gathered list: no collective is needed to save or restore them. `model_optim_rng.pt`
also carries DP rank 0's states under `rng_state` for tools that read only that file.

Every file goes to a temporary name in its final directory, is flushed and fsynced, then `os.replace`d, so a
crash leaves either the complete file or none under the final name. The tracker file is written by global rank 0
after a world barrier, so a crash mid-save never hides (or half-replaces) the previous checkpoint.
Loading checks the saved parallel layout against this run's before reading any shard; resharding is convert.py's.
A converted checkpoint (convert.py) has `data_parallel_size: null` in its layout: it holds whole-parameter
optimizer state (or none) and no RNG files, so it loads under any DP size, with or without ZeRO; each rank cuts
its own slices at load time (`_own_optimizer_state`) and keeps its freshly seeded RNG streams.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from megagpt.checkpoint.format import (FORMAT_VERSION, METADATA_FILE, MODEL_FILE, TRACKER_FILE, CheckpointError,
                                       check_compatible, is_converted, iteration_dir, layout_of, model_key,
                                       read_metadata, read_tracker, rng_file, shard_dir, zero_shard_file)
from megagpt.checkpoint.integrity import damage_message, digest_record, verify_files
from megagpt.config import Config
from megagpt.fileio import atomic_torch_save, atomic_write_text
from megagpt.parallel import comm
from megagpt.parallel import random as tp_random
from megagpt.parallel.param_tags import is_embedding_copy, tp_split_dim
from megagpt.parallel.state import ParallelState

@dataclass
class LoadedCheckpoint:
    """What `load_checkpoint` restored besides tensors: where training resumes, and this rank's RNG states."""

    iteration: int
    consumed_samples: int
    rng_state: Optional[dict]     # None: a converted checkpoint, the run keeps its freshly seeded streams
    consumed_valid_samples: int = 0   # validation continues where it was, not from the start of the split


# ---- state pieces -------------------------------------------------------------------------------------------
def _to_cpu(obj: Any) -> Any:
    """Detached CPU copies of every tensor in a nested dict/list, so files load on any device."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def get_rng_state(tracker: tp_random.RNGStatesTracker) -> dict:
    """Every generator this rank draws from: Python, NumPy, torch CPU, the device's, and the TP tracker streams."""
    device = tracker.device
    return {"random": random.getstate(), "np_random": np.random.get_state(),
            "torch_cpu": torch.get_rng_state(), "device_type": device.type,
            "device": tp_random.get_rng_state(device).cpu() if device.type != "cpu" else None,
            "tracker": _to_cpu(tracker.get_states())}


def set_rng_state(state: dict, tracker: tp_random.RNGStatesTracker) -> Optional[str]:
    """Restore `get_rng_state`'s output. Call it after anything that draws at start-up (e.g. DataLoader iterators).

    CPU and CUDA generators keep different state formats, so a checkpoint written on the other kind of device
    restores the host generators only and keeps this run's freshly seeded device streams: returns that notice
    (None when everything was restored)."""
    random.setstate(state["random"])
    np.random.set_state(state["np_random"])
    torch.set_rng_state(state["torch_cpu"])
    saved = state.get("device_type", "cpu" if state["device"] is None else "cuda")   # older checkpoints: inferred
    if saved != tracker.device.type:
        return (f"the checkpoint's device RNG streams were saved on {saved}, this run is on {tracker.device.type}: "
                f"dropout streams are re-seeded (host generators restored)")
    if state["device"] is not None:
        tp_random.set_rng_state(state["device"], tracker.device)
    tracker.set_states({k: v.to(torch.uint8) for k, v in state["tracker"].items()})
    return None


def _local_tensor_info(chunks: list[nn.Module], ps: ParallelState) -> dict:
    """name -> global shape, TP split dim (0 column/vocab, 1 row, None replicated), dtype, pp rank and chunk."""
    info = {}
    for c, chunk in enumerate(chunks):
        for name, p in chunk.named_parameters():
            split = tp_split_dim(p)
            shape = list(p.shape)
            if split is not None:
                shape[split] *= ps.tp_size
            info[name] = {"shape": shape, "split_dim": split, "dtype": str(p.dtype).replace("torch.", ""),
                          "pp_rank": ps.pp_rank, "chunk": c}
            if is_embedding_copy(p):
                info[name]["tied_to"] = "embedding.word_embeddings.weight"
    return info


def _gather_tensor_info(chunks: list[nn.Module], ps: ParallelState) -> dict:
    """Every stage's tensor info, on every rank, gathered over the pipeline group.

    Global rank 0's pipeline group holds TP rank 0 of every stage, and local shapes times TP give global shapes,
    so one gather over that group sees the whole model."""
    device = next(chunks[0].parameters()).device
    merged = {}
    for part in comm.all_gather_bytes(json.dumps(_local_tensor_info(chunks, ps)).encode(), ps.pp_group, device):
        merged.update(json.loads(part.decode()))
    return merged


# ---- save ---------------------------------------------------------------------------------------------------
@dataclass
class PendingSave:
    """One rank's part of a checkpoint, copied to host memory at the iteration boundary: what `write_files` puts on
    disk (synchronously, or in a background thread under --async-save) before `commit_checkpoint` marks it."""

    directory: str
    iteration: int
    device: torch.device
    files: list = field(default_factory=list)     # [(object for torch.save, path)]
    metadata: Optional[dict] = None               # global rank 0: metadata.json's content (less the file digests)
    digests: dict = field(default_factory=dict)   # this rank's written files: relative path -> size and CRC-32


def save_checkpoint(directory: str, iteration: int, config: Config, ps: ParallelState, chunks: list[nn.Module],
                    optimizer, tracker: tp_random.RNGStatesTracker, consumed_samples: int,
                    consumed_valid_samples: int = 0) -> str:
    """Write this rank's shards of iteration `iteration`, then (rank 0, after a barrier) the tracker file.

    `optimizer` is a TrainingOptimizer (`state_dict()` = {"optimizer", "scheduler"}); with the distributed
    optimizer its "optimizer" part is this DP rank's ZeRO shard. Collective: every rank must call it.
    Returns the iteration directory."""
    pending = prepare_checkpoint(directory, iteration, config, ps, chunks, optimizer, tracker, consumed_samples,
                                 consumed_valid_samples)
    write_files(pending)
    commit_checkpoint(pending, ps)
    return iteration_dir(directory, iteration)


def prepare_checkpoint(directory: str, iteration: int, config: Config, ps: ParallelState, chunks: list[nn.Module],
                       optimizer, tracker: tp_random.RNGStatesTracker, consumed_samples: int,
                       consumed_valid_samples: int = 0) -> PendingSave:
    """Collective: gather the tensor metadata and copy this rank's state to host memory (nothing is written)."""
    zero = config.parallel.use_distributed_optimizer
    save_optim, save_rng = not config.train.no_save_optim, not config.train.no_save_rng
    layout = layout_of(ps, len(chunks), zero)
    folder = shard_dir(directory, iteration, ps.tp_rank, ps.pp_rank)
    tensors = _gather_tensor_info(chunks, ps)           # collective: before any rank can fail on a write
    rng = get_rng_state(tracker) if save_rng else None
    optim_state = _to_cpu(optimizer.state_dict()) if save_optim else None
    pending = PendingSave(directory, iteration, next(chunks[0].parameters()).device)
    if ps.dp_rank == 0:
        state = {"iteration": iteration, "consumed_samples": consumed_samples,
                 "consumed_valid_samples": consumed_valid_samples, "checkpoint_version": FORMAT_VERSION,
                 "config": config.to_dict(), "layout": layout}
        for c, chunk in enumerate(chunks):
            state[model_key(c, len(chunks))] = _to_cpu(chunk.state_dict())
        if save_rng:
            state["rng_state"] = rng
        if save_optim:
            state["opt_param_scheduler"] = optim_state["scheduler"]
            if not zero:
                state["optimizer"] = optim_state
        pending.files.append((state, os.path.join(folder, MODEL_FILE)))
    if zero and save_optim:
        pending.files.append(({"iteration": iteration, "layout": layout, "optimizer": optim_state},
                              zero_shard_file(folder, ps.dp_rank)))
    if save_rng:
        pending.files.append((rng, rng_file(folder, ps.dp_rank)))
    if ps.rank == 0:
        pending.metadata = {"format_version": FORMAT_VERSION, "iteration": iteration,
                            "consumed_samples": consumed_samples, "has_optimizer": save_optim, "has_rng": save_rng,
                            "layout": layout, "tokenizer_type": config.data.tokenizer_type,
                            "padded_vocab_size": getattr(chunks[0], "padded_vocab", None),
                            "config": config.to_dict(), "tensors": tensors}
    return pending


def write_files(pending: PendingSave) -> None:
    """Put this rank's files on disk, each atomically (temporary name, fsync, rename), and record their digests;
    no collective. metadata.json is commit_checkpoint's: it lists every rank's digests."""
    folder = iteration_dir(pending.directory, pending.iteration)
    for obj, path in pending.files:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pending.digests[os.path.relpath(path, folder)] = digest_record(*atomic_torch_save(obj, path))


def commit_checkpoint(pending: PendingSave, ps: ParallelState) -> None:
    """Collective, once every rank's files are written: rank 0 writes metadata.json with every rank's file digests,
    then the tracker, which marks the checkpoint complete."""
    every = comm.all_gather_bytes(json.dumps(pending.digests).encode(), None, pending.device)  # after all writes
    if ps.rank == 0:
        files = {rel: d for part in every for rel, d in json.loads(part.decode()).items()}
        folder = iteration_dir(pending.directory, pending.iteration)
        os.makedirs(folder, exist_ok=True)
        atomic_write_text(json.dumps({**pending.metadata, "files": files}, indent=1, sort_keys=True),
                          os.path.join(folder, METADATA_FILE))
        atomic_write_text(f"{pending.iteration}\n", os.path.join(pending.directory, TRACKER_FILE))
    dist.barrier()                                      # the tracker is visible to every rank on return


# ---- load ---------------------------------------------------------------------------------------------------
def _load_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint shard {path} is missing")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_checkpoint(directory: str, config: Config, ps: ParallelState, chunks: list[nn.Module], optimizer,
                    iteration: Optional[int] = None) -> LoadedCheckpoint:
    """Restore model chunks and optimizer + scheduler state of this rank in place; return iteration, consumed
    samples and this rank's RNG states (apply them with `set_rng_state` once start-up has finished drawing).

    Collective: the layout check runs on every rank from metadata.json, then every rank verifies the digests of
    the files it is about to read and the ranks agree, so all fail alike, with one message, before any shard is
    unpickled."""
    meta = read_metadata(directory, iteration)
    check_compatible(meta, config, ps, len(chunks))
    load_optim, load_rng = _check_loadable(meta, config)
    iteration = meta["iteration"]
    folder = shard_dir(directory, iteration, ps.tp_rank, ps.pp_rank)
    converted = is_converted(meta["layout"])
    # Every DP replica reads the (tp, pp) model file; one checksum of it (DP rank 0's) is enough for the agreement.
    reads = [os.path.join(folder, MODEL_FILE)] if ps.dp_rank == 0 else []
    if load_optim and config.parallel.use_distributed_optimizer and not converted:
        reads.append(zero_shard_file(folder, ps.dp_rank))
    if load_rng and not converted:
        reads.append(rng_file(folder, ps.dp_rank))
    _agree_files_intact(directory, meta, reads, next(chunks[0].parameters()).device)
    state = _load_file(os.path.join(folder, MODEL_FILE))
    keys = [model_key(c, len(chunks)) for c in range(len(chunks))]
    for key, chunk in zip(keys, chunks):
        if key not in state:
            raise CheckpointError(f"{folder}/{MODEL_FILE} has no {key!r} (keys: {sorted(state)})")
        chunk.load_state_dict(state[key], strict=True)   # copies in place: params stay views of their buffers
    weights = {n: t for key in keys for n, t in state[key].items()}
    if not load_optim:     # fresh optimizer and schedule, fp32 masters from the loaded weights (not their rounding)
        optimizer.load_state_dict(_own_optimizer_state(optimizer.state_dict(), None, weights))
    elif converted:
        optimizer.load_state_dict(_own_optimizer_state(optimizer.state_dict(), state.get("optimizer"), weights))
    elif config.parallel.use_distributed_optimizer:
        optimizer.load_state_dict(_load_file(zero_shard_file(folder, ps.dp_rank))["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])   # after the model: fp32 masters overwrite bf16 rounding
    rng = _load_file(rng_file(folder, ps.dp_rank)) if load_rng and not converted else None
    if config.train.finetune:   # weights only: training starts over on its own data and schedule
        return LoadedCheckpoint(iteration=0, consumed_samples=0, rng_state=None)
    return LoadedCheckpoint(iteration=iteration, consumed_samples=int(state["consumed_samples"]), rng_state=rng,
                            consumed_valid_samples=int(state.get("consumed_valid_samples", 0)))


def _agree_files_intact(directory: str, meta: dict, paths: list[str], device: torch.device) -> None:
    """Collective over the world: CheckpointError on every rank when any rank's files fail their recorded digests."""
    folder = iteration_dir(directory, meta["iteration"])
    mine = verify_files(directory, meta, [os.path.relpath(p, folder) for p in paths])
    every = comm.all_gather_bytes(json.dumps(mine).encode(), None, device)
    problems = sorted({p for part in every for p in json.loads(part.decode())})
    if problems:
        raise CheckpointError(damage_message(directory, meta["iteration"], problems))


def _check_loadable(meta: dict, config: Config) -> tuple[bool, bool]:
    """Whether to load optimizer state and RNG states; CheckpointError when the checkpoint lacks what is asked."""
    t = config.train
    load_optim, load_rng = not (t.finetune or t.no_load_optim), not (t.finetune or t.no_load_rng)
    if load_optim and not meta.get("has_optimizer", True):
        raise CheckpointError(f"the checkpoint of iteration {meta['iteration']} holds no optimizer state (saved with "
                              f"--no-save-optim): pass --no-load-optim or --finetune")
    if load_rng and not meta.get("has_rng", True) and not is_converted(meta["layout"]):
        raise CheckpointError(f"the checkpoint of iteration {meta['iteration']} holds no RNG states (saved with "
                              f"--no-save-rng): pass --no-load-rng or --finetune")
    return load_optim, load_rng


def _own_optimizer_state(fresh: dict, saved: Optional[dict], weights: dict[str, torch.Tensor]) -> dict:
    """A converted checkpoint's whole-parameter optimizer state cut to this rank's own layout.

    `fresh` is this rank's `TrainingOptimizer.state_dict()` before loading: its `shard_layout` says which flat range
    of each parameter the rank steps (all of it without ZeRO) and its entries which hold a separate fp32 master.
    `saved` None (a model-only checkpoint, e.g. imported from Hugging Face) gives a fresh optimizer and schedule
    whose fp32 masters start from the saved weights, not from the model's bf16/fp16 rounding of them."""
    own = fresh["optimizer"]
    saved_optim = saved["optimizer"] if saved is not None else {}
    saved_state = saved_optim.get("param_state", {})
    flat = "dp_size" in own                     # ZeRO masters and moments are flat slices; else param-shaped
    param_state = {}
    for name, where in own["shard_layout"].items():
        entry = dict(saved_state.get(name, {}))
        if "master" in own["param_state"][name] and "master" not in entry:
            entry["master"] = weights[name].float()
        param_state[name] = {k: _own_slice(v, where, flat) for k, v in entry.items()}
    optim = {**own, "param_state": param_state}
    for key in ("param_groups", "grad_scaler", "skipped_iterations"):
        if key in saved_optim:
            optim[key] = saved_optim[key]
    return {"optimizer": optim, "scheduler": saved["scheduler"] if saved is not None else fresh["scheduler"]}


def _own_slice(value: Any, where: dict, flat: bool) -> Any:
    """This rank's [start, end) of a whole-parameter tensor (0-dim values such as Adam's step are shared)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    part = value.reshape(-1)[where["start"]:where["end"]]
    return part.clone() if flat else part.view(where["shape"]).clone()


def prune_checkpoints(directory: str, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints (--keep-last-n-checkpoints); returns the deleted
    iterations. Called after the tracker names the newest, so an interrupted save never costs an older one, and
    iterations newer than the tracker (a save in progress) are left alone."""
    latest = read_tracker(directory)
    complete = sorted(int(n[len("iter_"):]) for n in os.listdir(directory)
                      if n.startswith("iter_") and n[len("iter_"):].isdigit() and int(n[len("iter_"):]) <= latest)
    doomed = complete[:-keep] if keep > 0 else []
    for iteration in doomed:
        shutil.rmtree(iteration_dir(directory, iteration))
    return doomed
