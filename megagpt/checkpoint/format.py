"""The on-disk checkpoint format in one place: file and folder names, state-dict keys, layout metadata, tracker.

Native layout (Megatron's legacy layout plus our metadata.json; DESIGN.md "Checkpoints"):
```
latest_checkpointed_iteration.txt          iteration number; written last, after every rank's files are on disk
iterations_to_skip.json                    (after an --on-spike rollback) iterations a resume only reads data for
iter_0000100/
  metadata.json                            global rank 0: config, layout, iteration, tensors (global shape, TP dim),
                                           every file's size and CRC-32 (integrity.py)
  mp_rank_{tp:02d}_{pp:03d}/
    model_optim_rng.pt                     DP rank 0 of (tp, pp): model chunks, optimizer (non-ZeRO) + scheduler
    distrib_optim_dp{dp:03d}.pt            every DP rank with --use-distributed-optimizer: its ZeRO shard
    rng_dp{dp:03d}.pt                      every rank: its own RNG states
```
DeepSpeed layout (`--deepspeed`): a `latest` file naming `global_step{N}/` (see engines/deepspeed.py).
sharded.py writes and reads the native layout, convert.py rewrites it; both take every name from here.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Iterable, Optional

from megagpt.config import Config, ModelConfig
from megagpt.fileio import atomic_write_text

if TYPE_CHECKING:   # annotations only: the format needs no process groups
    from megagpt.parallel.state import ParallelState

FORMAT_VERSION = 1
TRACKER_FILE = "latest_checkpointed_iteration.txt"
METADATA_FILE = "metadata.json"
MODEL_FILE = "model_optim_rng.pt"
# Model-config fields that change tensor shapes: a mismatch is reported by name, not as a torch size error.
# The variant fields (#15) are here too: same shapes but another model (RoPE convention, norm, activation) must not
# load silently.
_ARCH_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
                "max_position_embeddings", "make_vocab_size_divisible_by", "position_embedding_type", "rotary_base",
                "rotary_percent", "rotary_interleaved", "rotary_seq_len_interpolation_factor",
                "use_rope_scaling", "rope_scaling_factor", "normalization", "swiglu", "num_query_groups",
                "untie_embeddings_and_output_weights", "disable_bias_linear", "add_qkv_bias", "qk_layernorm")
# Run history beside the tracker: iterations a resume must skip (--on-spike rollback). Not inside an iteration folder,
# so that a resume from the very checkpoint the run rolled back to still skips them.
SKIP_FILE = "iterations_to_skip.json"
DS_TRACKER = "latest"   # DeepSpeed's tracker name, read by its load_checkpoint and zero_to_fp32.py
DS_FORMAT = "deepspeed"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or was written for another layout."""


def iteration_dir(directory: str, iteration: int) -> str:
    return os.path.join(directory, f"iter_{iteration:07d}")


def shard_dir(directory: str, iteration: int, tp_rank: int, pp_rank: int) -> str:
    return os.path.join(iteration_dir(directory, iteration), f"mp_rank_{tp_rank:02d}_{pp_rank:03d}")


def layout_of(ps: ParallelState, num_chunks: int, use_distributed_optimizer: bool) -> dict:
    """The parallel layout a checkpoint's shards depend on."""
    return {"tensor_model_parallel_size": ps.tp_size, "pipeline_model_parallel_size": ps.pp_size,
            "data_parallel_size": ps.dp_size, "virtual_pipeline_chunks": num_chunks,
            "use_distributed_optimizer": bool(use_distributed_optimizer)}


def is_converted(layout: dict) -> bool:
    """A layout written by convert.py: whole-parameter optimizer state, loadable under any DP size and ZeRO."""
    return layout.get("data_parallel_size") is None


def describe_layout(layout: dict) -> str:
    if is_converted(layout):
        return (f"TP={layout['tensor_model_parallel_size']} PP={layout['pipeline_model_parallel_size']} DP=any "
                f"virtual-chunks={layout['virtual_pipeline_chunks']} (converted)")
    return (f"TP={layout['tensor_model_parallel_size']} PP={layout['pipeline_model_parallel_size']} "
            f"DP={layout['data_parallel_size']} virtual-chunks={layout['virtual_pipeline_chunks']} "
            f"distributed-optimizer={layout['use_distributed_optimizer']}")


def zero_shard_file(folder: str, dp_rank: int) -> str:
    """A DP rank's ZeRO optimizer shard inside its mp_rank folder."""
    return os.path.join(folder, f"distrib_optim_dp{dp_rank:03d}.pt")


def rng_file(folder: str, dp_rank: int) -> str:
    """A rank's RNG states inside its mp_rank folder."""
    return os.path.join(folder, f"rng_dp{dp_rank:03d}.pt")


def model_key(chunk: int, num_chunks: int) -> str:
    """Key of a model chunk's state dict in model_optim_rng.pt (Megatron: `model`, or `model0..` when interleaved)."""
    return "model" if num_chunks == 1 else f"model{chunk}"


def ds_checkpoint_tag(iteration: int) -> str:
    return f"global_step{iteration}"   # DeepSpeed's default tag


def ds_rng_file(folder: str, rank: int) -> str:
    """A rank's RNG states inside a DeepSpeed checkpoint folder (megagpt's addition to DeepSpeed's layout)."""
    return os.path.join(folder, f"rng_rank{rank:05d}.pt")


def read_tracker(directory: str) -> int:
    """The iteration named by `latest_checkpointed_iteration.txt` (clear error when absent or malformed)."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory!r} does not exist")
    path = os.path.join(directory, TRACKER_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"no {TRACKER_FILE} in {directory!r}: no complete checkpoint was saved there")
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number") from None


def complete_iterations(directory: str) -> list[int]:
    """Iterations in `directory` marked complete: at or below the tracker's, with a metadata.json."""
    try:
        latest = read_tracker(directory)
    except CheckpointError:
        return []
    found = [int(n[5:]) for n in os.listdir(directory) if n.startswith("iter_") and n[5:].isdigit()]
    return sorted(i for i in found if i <= latest and
                  os.path.isfile(os.path.join(iteration_dir(directory, i), METADATA_FILE)))


def read_iterations_to_skip(directory: str) -> list[int]:
    """The iterations recorded in `directory`'s SKIP_FILE (none when it is absent)."""
    path = os.path.join(directory, SKIP_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return sorted(json.load(f)["iterations_to_skip"])


def write_iterations_to_skip(directory: str, iterations: Iterable[int]) -> None:
    os.makedirs(directory, exist_ok=True)
    atomic_write_text(json.dumps({"iterations_to_skip": sorted(set(iterations))}) + "\n",
                      os.path.join(directory, SKIP_FILE))


def read_metadata(directory: str, iteration: Optional[int] = None) -> dict:
    """metadata.json of `iteration` (default: the tracker's)."""
    iteration = read_tracker(directory) if iteration is None else iteration
    path = os.path.join(iteration_dir(directory, iteration), METADATA_FILE)
    if not os.path.isfile(path):
        complete = complete_iterations(directory)
        raise CheckpointError(f"checkpoint of iteration {iteration} in {directory!r} is not complete: it has no "
                              f"{METADATA_FILE}; complete iterations there: {', '.join(map(str, complete)) or 'none'}")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')}, this code reads "
                              f"{FORMAT_VERSION}")
    return meta


def check_compatible(meta: dict, config: Config, ps: ParallelState, num_chunks: int) -> None:
    """Raise CheckpointError naming both layouts (or the differing model fields) when shards cannot load here."""
    here = layout_of(ps, num_chunks, config.parallel.use_distributed_optimizer)
    comparable = here
    if is_converted(meta["layout"]):   # DP size and ZeRO are chosen at load time
        comparable = {**here, "data_parallel_size": None, "use_distributed_optimizer": False}
    if meta["layout"] != comparable:
        raise CheckpointError(f"checkpoint of iteration {meta['iteration']} was saved with parallel layout "
                              f"[{describe_layout(meta['layout'])}] but this run uses [{describe_layout(here)}]; "
                              f"reshard it with megagpt.checkpoint.convert first")
    saved, ours = _resolved_arch(meta["config"]["model"]), _resolved_arch(config.to_dict()["model"])
    diff = [f"{k}: saved {saved[k]}, here {ours[k]}" for k in _ARCH_FIELDS if saved[k] != ours[k]]
    if diff:
        raise CheckpointError("checkpoint model differs from this config: " + "; ".join(diff))


def _resolved_arch(model: dict) -> dict:
    """Shape-defining fields with defaults resolved (ffn None = 4h, positions None = seq_length), so a checkpoint
    that spells a default out (e.g. imported from Hugging Face) matches a run that leaves it implicit."""
    cfg = ModelConfig(**model)
    out = {k: getattr(cfg, k) for k in _ARCH_FIELDS}
    out["ffn_hidden_size"], out["max_position_embeddings"] = cfg.ffn_size, cfg.max_positions
    out["num_query_groups"] = cfg.query_groups        # key/value heads, whether GQA is on or not
    return out


def checkpoint_format_problem(directory: str, deepspeed: bool) -> Optional[str]:
    """Why `--load directory` cannot resume under this backend, judged by the tracker files present (None: fine,
    or nothing to judge yet; a missing checkpoint is reported by the loader)."""
    native = os.path.isfile(os.path.join(directory, TRACKER_FILE))
    ds = os.path.isfile(os.path.join(directory, DS_TRACKER))
    if deepspeed and native and not ds:
        return (f"--load {directory} holds a native megagpt checkpoint ({TRACKER_FILE}) but --deepspeed was given: "
                f"resume it without --deepspeed")
    if not deepspeed and ds and not native:
        return (f"--load {directory} holds a DeepSpeed checkpoint ('{DS_TRACKER}' file) but --deepspeed was not "
                f"given: resume it with --deepspeed --deepspeed-config")
    return None


def has_checkpoint(directory: str, deepspeed: bool = False) -> bool:
    """Whether `--load directory` has a complete checkpoint to resume. A missing or empty directory has none (the
    run starts from scratch, as Megatron does, so one script can pass --save X --load X from the first run on);
    checkpoint folders without the tracker file that marks one complete are an error, not a fresh start."""
    tracker = DS_TRACKER if deepspeed else TRACKER_FILE
    if os.path.isfile(os.path.join(directory, tracker)):
        return True
    if not os.path.isdir(directory):
        return False
    folders = sorted(n for n in os.listdir(directory) if n.startswith(("iter_", "global_step")))
    if folders:
        raise CheckpointError(f"--load {directory} holds checkpoint folders ({', '.join(folders[:3])}) but no "
                              f"{tracker}: no save there completed (or the tracker was deleted). Write the iteration "
                              f"to resume into {tracker}, or point --load elsewhere")
    return False
