"""Optional DeepSpeed backend (`--deepspeed --deepspeed-config ds.json`) for users with existing DeepSpeed configs.

DeepSpeed owns data parallelism here (ZeRO stages 1-3, CPU offload); megagpt supplies the model (tensor
parallel when TP > 1), the AdamW param groups (no decay on biases/LayerNorm) and the LR schedule. Batch sizes,
gradient accumulation, precision and clipping are written into the DeepSpeed config from megagpt's flags so the two
can never disagree. Imported only when --deepspeed is given: DeepSpeed is not a dependency of the native path.

Tensor parallelism: DeepSpeed gets megagpt's process groups through its `mpu` protocol (`ParallelStateMPU`), so it
reduces grads and partitions ZeRO state over the DP group only, and its grad norm sums TP-split params over the
model-parallel group while counting replicated ones once (on model-parallel rank 0), like megagpt's clip.py.

ZeRO-3: the model (this rank's TP shard) is built whole on every rank by megagpt's per-name seeded init, so
identically on every DP rank, and `deepspeed.initialize` partitions it afterwards. It is never built under
`deepspeed.zero.Init`, whose partitioned construction would bypass that init; start-up peak memory is therefore one
TP shard of the model per rank.

CPU offload (`"offload_optimizer": {"device": "cpu"}`) keeps megagpt's torch AdamW (`zero_force_ds_cpu_optimizer`
is set false): it is the native path's update kernel, so offload changes where the step runs, not its arithmetic.
DeepSpeedCPUAdam computes the same update but rounds differently (bias corrections in float32, `sqrt(v) *
(1/sqrt(bc2))` instead of `sqrt(v) / sqrt(bc2)`, fused multiply-adds: weights drift by ulps, 1e-6 after 5 steps on
unit-scale weights) and needs a C++ JIT build (~100 s on 2 cores); it is faster on large offloaded models.

Checkpoints (`--save/--load`) are DeepSpeed's own layout, so DeepSpeed tools (zero_to_fp32.py) read them:
```
latest                              tag of the newest complete checkpoint; written by megagpt, last
global_step{N}/
  *model_states.pt                  DeepSpeed: module per TP rank + client state (iteration, samples, LR schedule,
                                    config, rank 0's RNG states)
  *optim_states.pt                  DeepSpeed: each rank's ZeRO shard
  metadata.json                     megagpt: format, iteration, layout, config (checked before any shard is read)
  rng_rank{r:05d}.pt                megagpt: every rank's RNG states
```
DeepSpeed writes `latest` from rank 0 without waiting for the other ranks' shards, and writes files in place;
so megagpt saves under a temporary tag, renames the directory once every rank is done, then writes `latest`.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from megagpt.arguments import Config
from megagpt.checkpoint.sharded import (METADATA_FILE, TRACKER_FILE, CheckpointError, LoadedCheckpoint,
                                        atomic_torch_save, atomic_write_text, check_compatible, get_rng_state,
                                        layout_of)
from megagpt.optim.lr_schedule import LRScheduler
from megagpt.optim.mixed_precision import OptimizerConfig, build_torch_optimizer, uses_weight_decay
from megagpt.parallel import random as tp_random
from megagpt.parallel.state import ParallelState

DS_TRACKER = "latest"   # DeepSpeed's tracker name, read by its load_checkpoint and zero_to_fp32.py
DS_FORMAT = "deepspeed"


def deepspeed_config(config: Config, num_microbatches: int) -> dict:
    """The user's DeepSpeed JSON with batch, precision and clipping fields taken from megagpt's config."""
    ds: dict = {}
    if config.parallel.deepspeed_config:
        with open(config.parallel.deepspeed_config) as f:
            ds = json.load(f)
    ds.pop("optimizer", None)   # megagpt's AdamW (param groups) and LR schedule are used
    ds.pop("scheduler", None)
    ds.update(train_micro_batch_size_per_gpu=config.train.micro_batch_size,
              gradient_accumulation_steps=num_microbatches, train_batch_size=config.train.global_batch_size,
              gradient_clipping=config.optim.clip_grad,
              zero_force_ds_cpu_optimizer=False)   # offload keeps torch AdamW: see the module docstring
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": config.optim.bf16}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": config.optim.fp16}
    if config.optim.fp16:
        ds["fp16"].setdefault("initial_scale_power", int(torch.log2(torch.tensor(config.optim.initial_loss_scale))))
        ds["fp16"].setdefault("loss_scale_window", config.optim.loss_scale_window)
        ds["fp16"].setdefault("hysteresis", config.optim.hysteresis)
        ds["fp16"].setdefault("min_loss_scale", config.optim.min_loss_scale)
    ds.setdefault("zero_optimization", {"stage": 1})
    return ds


def checkpoint_tag(iteration: int) -> str:
    return f"global_step{iteration}"   # DeepSpeed's default tag


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


def _fsync_tree(folder: str) -> None:
    """Flush every file under `folder` and the folders themselves (DeepSpeed's torch.save does not fsync)."""
    for root, _, files in os.walk(folder):
        for path in [os.path.join(root, f) for f in files] + [root]:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class ParallelStateMPU:
    """DeepSpeed's `mpu` protocol (Megatron's old `mpu` module: model-, tensor-, pipeline- and data-parallel getters)
    answered from a ParallelState. Passed even at TP = 1 so DeepSpeed's process-global `groups.mpu` always matches
    the layout being trained."""

    def __init__(self, ps: ParallelState) -> None:
        self.ps = ps

    def get_model_parallel_rank(self) -> int:
        return self.ps.mp_ranks.index(self.ps.rank)

    def get_model_parallel_world_size(self) -> int:
        return len(self.ps.mp_ranks)

    def get_model_parallel_group(self):
        return self.ps.mp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.tp_size

    def get_tensor_model_parallel_group(self):
        return self.ps.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.tp_src_rank

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.pp_size

    def get_pipeline_model_parallel_group(self):
        return self.ps.pp_group

    def get_data_parallel_rank(self) -> int:
        return self.ps.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.ps.dp_size

    def get_data_parallel_group(self):
        return self.ps.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.ps.dp_ranks)


class DeepSpeedTrainer:
    """Runs one optimizer step as DeepSpeed expects: engine(batch) -> engine.backward -> engine.step per micro-batch."""

    def __init__(self, config: Config, model: nn.Module, ps: ParallelState, num_microbatches: int,
                 local_rank: int) -> None:
        import deepspeed  # optional dependency

        # DeepSpeed reads the local rank from the environment only; srun, mpirun (MPICH) and plain `python` launches,
        # which megagpt's launcher accepts, do not set it.
        os.environ.setdefault("LOCAL_RANK", str(local_rank))

        o = config.optim
        optimizer = build_torch_optimizer([p for p in model.parameters() if uses_weight_decay(p)],
                                          [p for p in model.parameters() if not uses_weight_decay(p)],
                                          OptimizerConfig.from_object(o))
        self.ds_config = deepspeed_config(config, num_microbatches)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config, mpu=ParallelStateMPU(ps))
        self.scheduler = LRScheduler(self.optimizer, o.lr, o.min_lr, o.lr_warmup_iters,
                                     o.lr_decay_iters or config.train.train_iters, o.lr_decay_style)

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, bool, Optional[float]]:
        """Mean micro-batch loss of this rank, whether the update was applied, and the grad norm."""
        self.engine.train()
        losses = []
        for tokens, labels in batches:
            loss = self.engine(tokens=tokens, labels=labels).float().mean()   # token mean of this micro-batch
            self.engine.backward(loss)                                         # scaled by 1/accumulation steps
            self.engine.step()                                                 # steps at the boundary only
            losses.append(loss.detach())
        if self.engine.was_step_applied():
            self.scheduler.step()
        norm = self.engine.get_global_grad_norm()
        return float(torch.stack(losses).mean()), bool(self.engine.was_step_applied()), \
            None if norm is None else float(norm)

    @property
    def loss_scale(self) -> float:
        return float(getattr(self.optimizer, "cur_scale", 1.0)) if self.engine.fp16_enabled() else 1.0

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of this rank's model params: its ZeRO-3 partitions, else whole params (DeepSpeed keeps its own
        grad and optimizer buffers)."""
        local = lambda p: p.ds_tensor if hasattr(p, "ds_tensor") else p  # noqa: E731
        return {"params": sum(local(p).numel() * p.element_size() for p in self.engine.module.parameters())}

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def save_checkpoint(self, directory: str, iteration: int, config: Config, ps: ParallelState,
                        tracker: tp_random.RNGStatesTracker, consumed_samples: int) -> str:
        """Write the checkpoint of `iteration` (collective) and point `latest` at it only once it is complete.

        DeepSpeed writes under a temporary tag; after a barrier rank 0 flushes it, renames it to its final tag,
        then writes `latest`. An older checkpoint of the same tag (another run's, in the same directory) is moved to
        `.old-<tag>` first and deleted after; should `latest` name that very tag, a crash between the two renames
        leaves it naming a missing directory (reported on load) with the old files kept in `.old-<tag>`.
        Returns the checkpoint's directory."""
        tag, tmp_tag = checkpoint_tag(iteration), f".tmp-{checkpoint_tag(iteration)}"
        final, tmp = os.path.join(directory, tag), os.path.join(directory, tmp_tag)
        if ps.rank == 0 and os.path.isdir(tmp):
            shutil.rmtree(tmp)                          # left by a crashed save: never pointed to
        dist.barrier()
        rng = get_rng_state(tracker)
        client_state = {"iteration": iteration, "consumed_samples": consumed_samples, "config": config.to_dict(),
                        "opt_param_scheduler": self.scheduler.state_dict(), "rng_state": rng}
        self.engine.save_checkpoint(directory, tag=tmp_tag, client_state=client_state, save_latest=False)
        atomic_torch_save(rng, os.path.join(tmp, f"rng_rank{ps.rank:05d}.pt"))
        if ps.rank == 0:
            meta = {"format": DS_FORMAT, "iteration": iteration, "consumed_samples": consumed_samples,
                    "layout": layout_of(ps, 1, False), "config": config.to_dict(), "deepspeed_config": self.ds_config}
            atomic_write_text(json.dumps(meta, indent=1, sort_keys=True), os.path.join(tmp, METADATA_FILE))
        dist.barrier()                                  # every rank's files are in the temporary tag
        if ps.rank == 0:
            _fsync_tree(tmp)
            old = os.path.join(directory, f".old-{tag}")
            if os.path.isdir(final):
                os.replace(final, old)
            os.replace(tmp, final)
            atomic_write_text(tag, os.path.join(directory, DS_TRACKER))   # fsyncs the renames too
            if os.path.isdir(old):
                shutil.rmtree(old)
        dist.barrier()                                  # `latest` is visible to every rank on return
        return final

    def load_checkpoint(self, directory: str, config: Config, ps: ParallelState) -> LoadedCheckpoint:
        """Restore the checkpoint `latest` names: module, ZeRO shards and LR schedule in place; returns iteration,
        consumed samples and this rank's RNG states. Layout and model shape are checked from metadata.json first."""
        tracker_path = os.path.join(directory, DS_TRACKER)
        if not os.path.isfile(tracker_path):
            raise CheckpointError(f"no '{DS_TRACKER}' file in {directory!r}: no complete DeepSpeed checkpoint there")
        tag = open(tracker_path).read().strip()
        folder = os.path.join(directory, tag)
        meta_path = os.path.join(folder, METADATA_FILE)
        if not os.path.isfile(meta_path):
            raise CheckpointError(f"'{DS_TRACKER}' in {directory!r} names {tag!r}, which has no {METADATA_FILE}")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != DS_FORMAT:
            raise CheckpointError(f"{meta_path} is not a megagpt DeepSpeed checkpoint (format {meta.get('format')!r})")
        here = layout_of(ps, 1, False)
        if meta["layout"] != here:
            raise CheckpointError(f"DeepSpeed checkpoint {folder!r} was saved with layout {meta['layout']} but this "
                                  f"run uses {here}: DeepSpeed reloads ZeRO shards only under the same layout")
        check_compatible(meta, config, ps, 1)           # model shape, before any shard is read
        path, client_state = self.engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {folder!r}")
        self.scheduler.load_state_dict(client_state["opt_param_scheduler"])
        rng_path = os.path.join(folder, f"rng_rank{ps.rank:05d}.pt")
        if not os.path.isfile(rng_path):
            raise CheckpointError(f"checkpoint shard {rng_path} is missing")
        rng = torch.load(rng_path, map_location="cpu", weights_only=False)
        return LoadedCheckpoint(iteration=int(client_state["iteration"]),
                                consumed_samples=int(client_state["consumed_samples"]), rng_state=rng)
