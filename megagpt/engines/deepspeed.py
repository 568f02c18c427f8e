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

from megagpt.checkpoint.format import (DS_FORMAT, DS_TRACKER, METADATA_FILE, CheckpointError, check_compatible,
                                       ds_checkpoint_tag, ds_rng_file, layout_of)
from megagpt.checkpoint.sharded import LoadedCheckpoint, get_rng_state
from megagpt.config import Config, final_global_batch_size, num_microbatches, schedule_steps
from megagpt.data.documents import documents_of
from megagpt.engines.base import MicroBatch, token_mean
from megagpt.engines.native import run_schedule
from megagpt.fileio import atomic_torch_save, atomic_write_text, fsync_tree
from megagpt.optim.lr_schedule import build_scheduler
from megagpt.optim.mixed_precision import build_torch_optimizer, uses_weight_decay
from megagpt.parallel import random as tp_random
from megagpt.parallel.param_tags import is_tensor_parallel
from megagpt.parallel.state import ParallelState



def deepspeed_config(config: Config, dp_size: int) -> dict:
    """The user's DeepSpeed JSON with batch, precision and clipping fields taken from megagpt's config."""
    ds: dict = {}
    if config.parallel.deepspeed_config:
        with open(config.parallel.deepspeed_config) as f:
            ds = json.load(f)
    ds.pop("optimizer", None)   # megagpt's AdamW (param groups) and LR schedule are used
    ds.pop("scheduler", None)
    ds.update(train_micro_batch_size_per_gpu=config.train.micro_batch_size,
              gradient_accumulation_steps=num_microbatches(config, dp_size),
              train_batch_size=final_global_batch_size(config, dp_size),
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


class DeepSpeedEngine:
    """Runs one optimizer step as DeepSpeed expects: engine(batch) -> engine.backward -> engine.step per micro-batch.
    Evaluation runs megagpt's forward-only schedule on the same module (ZeRO-3 gathers params in its hooks)."""

    def __init__(self, config: Config, chunks: list[nn.Module], ps: ParallelState,
                 tracker: tp_random.RNGStatesTracker, local_rank: int) -> None:
        import deepspeed  # optional dependency

        self.config, self.chunks, self.ps, self.tracker = config, chunks, ps, tracker
        model = chunks[0]
        for p in model.parameters():   # DeepSpeed's grad norm reads Megatron's attribute to count TP shards
            p.tensor_model_parallel = is_tensor_parallel(p)

        # DeepSpeed reads the local rank from the environment only; srun, mpirun (MPICH) and plain `python` launches,
        # which megagpt's launcher accepts, do not set it.
        os.environ.setdefault("LOCAL_RANK", str(local_rank))

        o = config.optim
        optimizer = build_torch_optimizer([p for p in model.parameters() if uses_weight_decay(p)],
                                          [p for p in model.parameters() if not uses_weight_decay(p)],
                                          o)
        self.ds_config = deepspeed_config(config, ps.dp_size)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config, mpu=ParallelStateMPU(ps))
        self.scheduler = build_scheduler(self.optimizer, o, schedule_steps(config, ps.dp_size))

    def train_step(self, batches: list[MicroBatch], num_microbatches: int,
                   global_batch_size: int) -> tuple[float, bool, Optional[float]]:
        """Mean micro-batch loss of this rank, whether the update was applied, and the grad norm."""
        self.engine.train()
        losses = []
        for tokens, labels, loss_mask in batches:   # PP = 1 here (config.rules): every rank holds its tokens
            position_ids, document_ids = documents_of(tokens, self.config.data) or (None, None)
            out = self.engine(tokens=tokens, labels=labels, position_ids=position_ids, document_ids=document_ids)
            loss = token_mean(out, loss_mask)                                  # this micro-batch's mean
            self.engine.backward(loss)                                         # scaled by 1/accumulation steps
            self.engine.step()                                                 # steps at the boundary only
            losses.append(loss.detach())
        if self.engine.was_step_applied():
            self.scheduler.step(increment=global_batch_size)
        norm = self.engine.get_global_grad_norm()
        return float(torch.stack(losses).mean()), bool(self.engine.was_step_applied()), \
            None if norm is None else float(norm)

    def eval_step(self, batches: list[MicroBatch], num_microbatches: int) -> float:
        return run_schedule(self.config, self.chunks, self.ps, batches, num_microbatches, forward_only=True)

    @property
    def loss_scale(self) -> float:
        return float(getattr(self.optimizer, "cur_scale", 1.0)) if self.engine.fp16_enabled() else 1.0

    @property
    def num_zeros_in_grad(self) -> Optional[int]:
        return None   # config.validate refuses --log-num-zeros-in-grad with --deepspeed

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of this rank's model params: its ZeRO-3 partitions, else whole params (DeepSpeed keeps its own
        grad and optimizer buffers)."""
        local = lambda p: p.ds_tensor if hasattr(p, "ds_tensor") else p  # noqa: E731
        return {"params": sum(local(p).numel() * p.element_size() for p in self.engine.module.parameters())}

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def save(self, directory: str, iteration: int, consumed_samples: int, consumed_valid_samples: int) -> str:
        """Write the checkpoint of `iteration` (collective) and point `latest` at it only once it is complete.

        DeepSpeed writes under a temporary tag; after a barrier rank 0 flushes it, renames it to its final tag,
        then writes `latest`. An older checkpoint of the same tag (another run's, in the same directory) is moved to
        `.old-<tag>` first and deleted after; should `latest` name that very tag, a crash between the two renames
        leaves it naming a missing directory (reported on load) with the old files kept in `.old-<tag>`.
        Returns the checkpoint's directory."""
        config, ps, tracker = self.config, self.ps, self.tracker
        tag, tmp_tag = ds_checkpoint_tag(iteration), f".tmp-{ds_checkpoint_tag(iteration)}"
        final, tmp = os.path.join(directory, tag), os.path.join(directory, tmp_tag)
        if ps.rank == 0 and os.path.isdir(tmp):
            shutil.rmtree(tmp)                          # left by a crashed save: never pointed to
        dist.barrier()
        rng = get_rng_state(tracker)
        client_state = {"iteration": iteration, "consumed_samples": consumed_samples,
                        "consumed_valid_samples": consumed_valid_samples, "config": config.to_dict(),
                        "opt_param_scheduler": self.scheduler.state_dict(), "rng_state": rng}
        self.engine.save_checkpoint(directory, tag=tmp_tag, client_state=client_state, save_latest=False)
        atomic_torch_save(rng, ds_rng_file(tmp, ps.rank))
        if ps.rank == 0:
            meta = {"format": DS_FORMAT, "iteration": iteration, "consumed_samples": consumed_samples,
                    "layout": layout_of(ps, 1, False), "config": config.to_dict(), "deepspeed_config": self.ds_config}
            atomic_write_text(json.dumps(meta, indent=1, sort_keys=True), os.path.join(tmp, METADATA_FILE))
        dist.barrier()                                  # every rank's files are in the temporary tag
        if ps.rank == 0:
            fsync_tree(tmp)
            old = os.path.join(directory, f".old-{tag}")
            if os.path.isdir(final):
                os.replace(final, old)
            os.replace(tmp, final)
            atomic_write_text(tag, os.path.join(directory, DS_TRACKER))   # fsyncs the renames too
            if os.path.isdir(old):
                shutil.rmtree(old)
        dist.barrier()                                  # `latest` is visible to every rank on return
        return final

    def poll_save(self, block: bool = False) -> Optional[tuple[str, int]]:
        return None   # saves are synchronous here

    def load(self, directory: str, iteration: Optional[int] = None) -> LoadedCheckpoint:
        """Restore the checkpoint `latest` names: module, ZeRO shards and LR schedule in place; returns iteration,
        consumed samples and this rank's RNG states. Layout and model shape are checked from metadata.json first."""
        config, ps = self.config, self.ps
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
        rng_path = ds_rng_file(folder, ps.rank)
        if not os.path.isfile(rng_path):
            raise CheckpointError(f"checkpoint shard {rng_path} is missing")
        rng = torch.load(rng_path, map_location="cpu", weights_only=False)
        return LoadedCheckpoint(iteration=int(client_state["iteration"]),
                                consumed_samples=int(client_state["consumed_samples"]), rng_state=rng,
                                consumed_valid_samples=int(client_state.get("consumed_valid_samples", 0)))
