"""ZeRO data parallelism (`--use-distributed-optimizer`): each DP rank steps only its 1/DP shard of the params.

Per rank and per parameter, with mixed-precision Adam (bytes: model param 2, fp32 grad 4, fp32 master 4, two fp32
moments 8 = 18 in plain DDP; the ZeRO paper's 16 assumes 2-byte grads, ours accumulate in fp32):
- ZeRO-1 (`zero_stage=1`): fp32 masters and moments exist only for the owned shard: 2 + 4 + 12/DP.
- ZeRO-2 (`zero_stage=2`): also the grads: after each bucket's reduce-scatter the full-size bucket is released
  and only the owned reduced shard stays (grad_buffer.py), so 2 + 4/DP + 12/DP between steps.
Ownership: DP rank r owns the r-th contiguous 1/DP slice of every grad bucket (grad_buffer.py says why per bucket);
the model params live in a param buffer of the same layout, so a step is
    reduce-scatter fp32 grads (bucketed) -> step the owned shard -> all-gather the updated params (model dtype),
whose traffic in fp32 equals one all-reduce of the grads, the minimum for data parallelism.

Masters are views (fp32 model) or fp32 copies (bf16/fp16) of the owned slice of each parameter, stepped by
torch.optim.AdamW like the non-sharded path, so the numerics are torch's AdamW element for element. Loss scaling,
inf/NaN skipping, clipping and the grad norm are shared with MixedPrecisionOptimizer; the norm sums the owned
shards over the model-parallel and DP groups.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
from torch import nn

from megagpt.config import OptimConfig
from megagpt.optim.grad_buffer import DataParallelGradReducer
from megagpt.optim.mixed_precision import MixedPrecisionOptimizer, _Slot
from megagpt.parallel import comm
from megagpt.timers import Timers


class DistributedOptimizer(MixedPrecisionOptimizer):
    """ZeRO-1/2 optimizer over a `DataParallelGradReducer(use_distributed_optimizer=True)`.

    `state_dict()` is this DP rank's shard: per parameter name the flat range owned (`shard_layout`), the fp32
    master slice (bf16/fp16) and the optimizer moments of that slice, plus `dp_rank`, `dp_size`, `zero_stage`.
    Every DP rank saves and loads its own (checkpoint: `distrib_optim_dp{dp:03d}.pt`).
    """

    dp_sharded = True

    def __init__(self, params: Iterable[nn.Parameter], ps, config: OptimConfig,
                 reducer: DataParallelGradReducer,
                 param_names: Optional[Mapping[nn.Parameter, str]] = None, timers: Optional[Timers] = None) -> None:
        if reducer is None or not reducer.use_distributed_optimizer:
            raise ValueError("DistributedOptimizer needs a DataParallelGradReducer built with "
                             "use_distributed_optimizer=True (its buffers define the shards)")
        super().__init__(params, ps, config, reducer, param_names, timers)

    def _build_slots(self) -> list[_Slot]:
        slots = []
        for buf in self.reducer.buffers:
            for r in buf.shard_ranges(self.ps.dp_rank):
                model_view = buf.param_data[r.buffer_start:r.buffer_start + r.numel]     # [numel] model dtype
                master = model_view if model_view.dtype == torch.float32 else \
                    model_view.detach().to(torch.float32, copy=True)
                slots.append(_Slot(self.names[id(r.param)], r.param, master, model_view,
                                   r.param_start, r.param_end, shard=r))
        return slots

    def _slot_grad(self, slot: _Slot) -> Optional[torch.Tensor]:
        return self.reducer.owned_grad(slot.shard)                                     # [numel] fp32, reduced

    def _copy_masters_to_model(self) -> None:
        """Write the owned shards into the param buffer, then all-gather every bucket over DP (in place)."""
        super()._copy_masters_to_model()
        with self.timers("params-all-gather", 1):
            handles = []
            for buf in self.reducer.buffers:
                for b in buf.buckets:
                    lo, hi = b.owned_range(self.ps.dp_size, self.ps.dp_rank)
                    handles.append(comm.all_gather_into(buf.param_bucket_data(b), buf.param_data[lo:hi],
                                                        self.ps.dp_group, async_op=True))
            for h in handles:
                if h is not None:
                    h.wait()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(dp_rank=self.ps.dp_rank, dp_size=self.ps.dp_size, zero_stage=self.reducer.zero_stage)
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("dp_size") != self.ps.dp_size or state.get("dp_rank") != self.ps.dp_rank:
            raise ValueError(f"ZeRO shard saved for dp_rank {state.get('dp_rank')} of {state.get('dp_size')} "
                             f"cannot load into dp_rank {self.ps.dp_rank} of {self.ps.dp_size}")
        super().load_state_dict(state)


def build_dp_optimizer(ps, config: OptimConfig, reducer: DataParallelGradReducer,
                    param_names: Optional[Mapping[nn.Parameter, str]] = None) -> MixedPrecisionOptimizer:
    """DistributedOptimizer when the reducer shards (ZeRO), else MixedPrecisionOptimizer, over the reducer's params."""
    cls = DistributedOptimizer if reducer.use_distributed_optimizer else MixedPrecisionOptimizer
    return cls(reducer.params, ps, config, reducer, param_names)
