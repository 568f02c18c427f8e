"""Contiguous fp32 gradient buffers split into buckets, and their data-parallel reduction (DDP or ZeRO).

Why one buffer: every parameter's gradient is a view (`param.main_grad`) into one flat fp32 tensor per parameter
dtype, so the DP reduction is a few large collectives over buckets instead of one per parameter, micro-batch
accumulation happens in fp32 even for bf16/fp16 parameters, and ZeRO can own a contiguous slice of each bucket.

Layout: parameters in reverse registration order (the order backward produces their grads), packed into buckets of
~`bucket_size` elements (a parameter never straddles two buckets), each bucket padded to a multiple of
`BUCKET_ALIGN * dp_size` so every DP shard has the same size and starts aligned. Under ZeRO, DP rank r owns the
r-th contiguous 1/DP slice of every bucket (owning 1/DP of each bucket, rather than one 1/DP range of the whole
buffer, is what lets each bucket's reduce-scatter start as soon as that bucket is complete).

Parameters whose grads need a reduction over another group *before* the DP one (sequence-parallel replicated
params over TP, the tied word embedding over the embedding group) sit in buckets of their own at the end of the
buffer; those buckets are never launched early by the overlap hooks, only by `finish_grad_sync` after
`finalize_model_grads` has run the pre-reductions (see its docstring for why the order matters).

ZeRO-2 memory: each bucket gets its own storage instead of a view of one tensor, so that after its reduce-scatter
the full-size bucket (4 bytes x bucket numel) is released and only this rank's reduced 1/DP shard (a persistent
`grad_shard` tensor) is kept. Between the end of a step's DP reduction and the first gradient of the next step's
backward a rank therefore holds 4/DP bytes of grads per parameter instead of 4; buckets are re-allocated (zeroed)
lazily, one at a time, when backward produces their first gradient. Across micro-batches the full buckets stay
alive: reducing every micro-batch would multiply the DP traffic by the number of micro-batches.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from megagpt.optim.bucket_layout import (BUCKET_ALIGN, KIND_DP, KIND_EMBEDDING_SYNC,  # noqa: F401 (re-exported)
                                          KIND_TP_SYNC, bucket_layout)
from megagpt.optim.clip import param_grad
from megagpt.parallel import comm
from megagpt.parallel.param_tags import is_sequence_parallel, is_shared_embedding
from megagpt.timers import Timers



@dataclass(eq=False)
class Bucket:
    """A contiguous run of the buffer reduced by one collective; [start, end) in buffer elements, end padded."""

    index: int
    kind: str
    params: list[nn.Parameter]
    start: int
    end: int
    data: Optional[torch.Tensor] = None          # [end - start] fp32 grads (a view, or own storage under ZeRO-2)
    grad_shard: Optional[torch.Tensor] = None    # ZeRO-2: this rank's reduced slice, [numel / dp]
    ready: set = field(default_factory=set)      # ids of params whose grad is final (overlap bookkeeping)
    handle: object = None
    launched: bool = False

    @property
    def numel(self) -> int:
        return self.end - self.start

    def owned_range(self, dp_size: int, dp_rank: int) -> tuple[int, int]:
        """Buffer range [lo, hi) this DP rank owns after reduce-scatter."""
        shard = self.numel // dp_size
        return self.start + dp_rank * shard, self.start + (dp_rank + 1) * shard

    @property
    def allocated(self) -> bool:
        return self.data.untyped_storage().nbytes() > 0

    def allocate_(self) -> None:
        """(ZeRO-2) give a released bucket its storage back, zeroed; the params' main_grad views see it again."""
        if not self.allocated:
            self.data.untyped_storage().resize_(self.numel * self.data.element_size())
            self.data.zero_()

    def release_(self) -> None:
        """(ZeRO-2) free the full-size bucket; main_grad views into it are invalid until `allocate_`."""
        self.data.untyped_storage().resize_(0)


@dataclass(frozen=True, eq=False)
class ShardRange:
    """The part of one parameter inside this DP rank's owned slice of its bucket."""

    param: nn.Parameter
    bucket: Bucket
    param_start: int     # flat element range [param_start, param_end) within the parameter
    param_end: int
    buffer_start: int    # where that range sits in the buffer
    shard_offset: int    # where it sits in the bucket's owned shard (index into Bucket.grad_shard)

    @property
    def numel(self) -> int:
        return self.param_end - self.param_start


class GradBuffer:
    """All fp32 grads of a list of same-dtype params in one padded buffer, bucketed (see module docstring).

    `with_param_buffer` (ZeRO) also moves the params themselves into one contiguous buffer of their dtype with the
    same layout (`param.data` becomes a view), so updated shards are all-gathered straight into the model.
    """

    def __init__(self, params: list[nn.Parameter], kinds: dict[int, str], dp_size: int,
                 bucket_size: Optional[int], grad_dtype: torch.dtype = torch.float32,
                 separate_bucket_storage: bool = False, with_param_buffer: bool = False) -> None:
        assert params, "GradBuffer needs at least one parameter"
        self.params = list(params)
        self.dp_size = dp_size
        self.param_dtype = params[0].dtype
        self.grad_dtype = grad_dtype
        device = params[0].device
        self.layout = layout = bucket_layout([p.numel() for p in self.params], [kinds[id(p)] for p in self.params],
                                             dp_size, bucket_size)
        self.param_range: dict[int, tuple[int, int]] = {   # id(param) -> [start, end) in the buffer, unpadded
            id(self.params[i]): r for i, r in layout.param_range.items()}
        self.param_bucket: dict[int, Bucket] = {}
        self.buckets: list[Bucket] = []
        for span in layout.buckets:
            bucket = Bucket(index=len(self.buckets), kind=span.kind, params=[self.params[i] for i in span.params],
                            start=span.start, end=span.end)
            self.buckets.append(bucket)
            for i in span.params:
                self.param_bucket[id(self.params[i])] = bucket
        self.numel = layout.numel                             # padded: divisible by dp_size
        self.numel_unpadded = sum(p.numel() for p in self.params)

        if separate_bucket_storage:                           # ZeRO-2: each bucket releasable on its own
            self.data = None
            for b in self.buckets:
                b.data = torch.zeros(b.numel, dtype=grad_dtype, device=device)
                b.grad_shard = torch.zeros(b.numel // dp_size, dtype=grad_dtype, device=device)
        else:
            self.data = torch.zeros(self.numel, dtype=grad_dtype, device=device)
            for b in self.buckets:
                b.data = self.data[b.start:b.end]
        for p in self.params:
            b = self.param_bucket[id(p)]
            lo, hi = self.param_range[id(p)]
            p.main_grad = b.data[lo - b.start:hi - b.start].view(p.shape)

        self.param_data: Optional[torch.Tensor] = None
        if with_param_buffer:
            self.param_data = torch.zeros(self.numel, dtype=self.param_dtype, device=device)
            with torch.no_grad():
                for p in self.params:
                    lo, hi = self.param_range[id(p)]
                    view = self.param_data[lo:hi].view(p.shape)
                    view.copy_(p.data)
                    p.data = view

    def param_bucket_data(self, bucket: Bucket) -> torch.Tensor:
        """The bucket's slice of the param buffer (ZeRO)."""
        return self.param_data[bucket.start:bucket.end]

    def shard_ranges(self, dp_rank: int) -> list[ShardRange]:
        """Every (param, range) this DP rank owns, in buffer order; together they cover 1/DP of each bucket."""
        out = []
        for i, first, last in self.layout.owned_pieces(self.dp_size, dp_rank):
            p = self.params[i]
            bucket = self.param_bucket[id(p)]
            start = self.param_range[id(p)][0] + first
            out.append(ShardRange(p, bucket, first, last, start, start - bucket.owned_range(self.dp_size, dp_rank)[0]))
        return out


def _reduction_kind(p: nn.Parameter, tp_size: int, pp_size: int) -> str:
    sp = is_sequence_parallel(p) and tp_size > 1
    emb = is_shared_embedding(p) and pp_size > 1
    if sp and emb:
        raise NotImplementedError("a parameter both sequence_parallel and shared_embedding is not supported")
    return KIND_TP_SYNC if sp else KIND_EMBEDDING_SYNC if emb else KIND_DP


class DataParallelGradReducer:
    """Owns the grad buffers of a model's params and reduces them over ps.dp_group (all-reduce, or reduce-scatter
    for ZeRO), averaging by dp_size.

    Backward hooks (post-accumulate-grad) move each `param.grad` into `param.main_grad` (fp32) and drop it. With
    `overlap_grad_reduce`, on the last micro-batch (outside `no_sync()`, or `is_last_microbatch = True`), a bucket's
    collective starts asynchronously as soon as all its params' grads are final; `finish_grad_sync` launches
    whatever is left and waits for every handle. Build it after the model has its final device and dtype.
    """

    def __init__(self, params: Iterable[nn.Parameter], ps, bucket_size: Optional[int] = 40_000_000,
                 use_distributed_optimizer: bool = False, overlap_grad_reduce: bool = False,
                 zero_stage: int = 1, grad_dtype: torch.dtype = torch.float32) -> None:
        if zero_stage not in (1, 2):
            raise ValueError(f"zero_stage must be 1 or 2, got {zero_stage}")
        self.params: list[nn.Parameter] = []
        seen: set[int] = set()
        for p in params:                           # trainable, each once (a tied weight may be listed twice)
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        self.ps = ps
        self.dp_size = ps.dp_size
        self.use_distributed_optimizer = use_distributed_optimizer
        self.zero_stage = zero_stage if use_distributed_optimizer else 0
        self.overlap_grad_reduce = overlap_grad_reduce
        self.is_last_microbatch = True
        kinds = {id(p): _reduction_kind(p, ps.tp_size, ps.pp_size) for p in self.params}
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self.params:
            by_dtype.setdefault(p.dtype, []).append(p)
        self.buffers = [GradBuffer(group, kinds, self.dp_size, bucket_size, grad_dtype,
                                   separate_bucket_storage=self.zero_stage == 2,
                                   with_param_buffer=use_distributed_optimizer)
                        for group in by_dtype.values()]
        self._bucket_of = {id(p): buf.param_bucket[id(p)] for buf in self.buffers for p in buf.params}
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(p)) for p in self.params]

    # ---- backward side -------------------------------------------------------------------------------------
    def _make_hook(self, param: nn.Parameter):
        bucket = self._bucket_of[id(param)]

        def hook(p: torch.Tensor) -> None:
            if p.grad is None:
                return
            if bucket.launched:
                raise RuntimeError("a gradient arrived after its bucket's DP reduction started: call zero_grad() "
                                   "before the next step, and no_sync() for all but the last micro-batch")
            if self.zero_stage == 2:
                bucket.allocate_()
            p.main_grad.add_(p.grad)                                   # fp32 accumulation across micro-batches
            p.grad = None
            if self.overlap_grad_reduce and self.is_last_microbatch and bucket.kind == KIND_DP:
                bucket.ready.add(id(p))
                if len(bucket.ready) == len(bucket.params):
                    self._launch(bucket)
        return hook

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Micro-batches run inside accumulate grads without launching any reduction."""
        previous, self.is_last_microbatch = self.is_last_microbatch, False
        try:
            yield
        finally:
            self.is_last_microbatch = previous

    # ---- reduction -----------------------------------------------------------------------------------------
    def _launch(self, bucket: Bucket) -> None:
        group = self.ps.dp_group
        if self.zero_stage == 2:
            bucket.allocate_()                     # a bucket none of whose params got a grad this step
        if self.dp_size > 1:
            bucket.data.mul_(1.0 / self.dp_size)   # average before summing (keeps fp16-range grads in range)
        if self.use_distributed_optimizer:
            if self.zero_stage == 2:
                out = bucket.grad_shard
            else:                                  # in place: the owned slice of the bucket itself
                lo, hi = bucket.owned_range(self.dp_size, self.ps.dp_rank)
                out = bucket.data[lo - bucket.start:hi - bucket.start]
            bucket.handle = comm.reduce_scatter_into(out, bucket.data, group, async_op=True)
        else:
            bucket.handle = comm.all_reduce(bucket.data, group, async_op=True)
        bucket.launched = True

    def buckets(self) -> Iterator[Bucket]:
        for buf in self.buffers:
            yield from buf.buckets

    def start_grad_sync(self) -> None:
        """Launch every plain-DP bucket not yet launched (pre-reduced buckets wait for finish_grad_sync)."""
        for b in self.buckets():
            if not b.launched and b.kind == KIND_DP:
                self._launch(b)

    def finish_grad_sync(self) -> None:
        """Launch the remaining buckets, wait for all; ZeRO-2 then releases the full-size buckets."""
        for b in self.buckets():
            if not b.launched:
                self._launch(b)
        for b in self.buckets():
            if b.handle is not None:
                b.handle.wait()
                b.handle = None
            if self.zero_stage == 2:
                b.release_()

    def pre_reduction_grads(self, kind: str) -> list[torch.Tensor]:
        """Contiguous grad tensors (whole buckets) holding the params of `kind` (KIND_TP_SYNC/EMBEDDING_SYNC)."""
        out = []
        for b in self.buckets():
            if b.kind == kind:
                if b.launched:
                    raise RuntimeError(f"{kind} bucket already reduced over DP: finalize_model_grads must run first")
                if self.zero_stage == 2:
                    b.allocate_()
                out.append(b.data)
        return out

    def zero_grad(self) -> None:
        """Zero the grads (ZeRO-2: release the full buckets, re-allocated by the first grad) and reset the sync."""
        for b in self.buckets():
            if b.handle is not None:               # a step abandoned mid-reduction: never leave a collective behind
                b.handle.wait()
            b.handle, b.launched = None, False
            b.ready.clear()
            if self.zero_stage == 2:
                b.release_()
                b.grad_shard.zero_()
        for buf in self.buffers:
            if buf.data is not None:
                buf.data.zero_()
        for p in self.params:
            p.grad = None

    # ---- ZeRO views ----------------------------------------------------------------------------------------
    def owned_grad(self, r: ShardRange) -> torch.Tensor:
        """This rank's reduced grad for a shard range: a view into the bucket (ZeRO-1) or its grad_shard (ZeRO-2)."""
        if self.zero_stage == 2:
            return r.bucket.grad_shard[r.shard_offset:r.shard_offset + r.numel]
        lo = r.buffer_start - r.bucket.start
        return r.bucket.data[lo:lo + r.numel]

    def grad_bytes(self) -> int:
        """Bytes of grad storage this rank holds right now (measured from the tensors)."""
        total = 0
        for buf in self.buffers:
            if buf.data is not None:
                total += buf.data.untyped_storage().nbytes()
            else:
                for b in buf.buckets:
                    total += b.data.untyped_storage().nbytes() + b.grad_shard.untyped_storage().nbytes()
        return total


def _coalesced_all_reduce(tensors: list[torch.Tensor], group) -> None:
    if not tensors or comm.group_size(group) == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    comm.all_reduce(flat, group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def finalize_model_grads(params: Iterable[nn.Parameter], ps, reducer: Optional[DataParallelGradReducer],
                         timers: Optional[Timers] = None) -> None:
    """Make every grad final after the last backward of a step, in this order:

    1. all-reduce over ps.tp_group the grads of `sequence_parallel` params (each TP rank saw only its sequence
       slice, so its grad is partial);
    2. all-reduce over ps.embedding_group the grads of `shared_embedding` params when PP > 1 (input embedding on the
       first stage + LM-head copy on the last: both must apply the sum);
    3. reducer.finish_grad_sync(): average over DP.
    Why this order: the TP and embedding sums act on full per-parameter grads. Done after (3) they would see only
    the DP-owned shard under ZeRO (and nothing at all once ZeRO-2 has released the bucket) and would race with an
    in-flight overlapped DP collective on the same memory. So those params live in separate buckets that the
    overlap hooks never launch, and the DP reduction always comes last. `timers` (level 1) time the three under
    Megatron's names (layernorm-grads-all-reduce, embedding-grads-all-reduce) and grads-all-reduce or, under ZeRO,
    grads-reduce-scatter (with overlap, the wait for the in-flight buckets).
    """
    params = list(params)
    timers = timers or Timers()
    if reducer is not None:
        if ps.tp_size > 1:
            with timers("layernorm-grads-all-reduce", 1):
                _coalesced_all_reduce(reducer.pre_reduction_grads(KIND_TP_SYNC), ps.tp_group)
        if ps.pp_size > 1:
            with timers("embedding-grads-all-reduce", 1):
                _coalesced_all_reduce(reducer.pre_reduction_grads(KIND_EMBEDDING_SYNC), ps.embedding_group)
        with timers("grads-reduce-scatter" if reducer.use_distributed_optimizer else "grads-all-reduce", 1):
            reducer.finish_grad_sync()
        return
    if ps.tp_size > 1:
        _coalesced_all_reduce([param_grad(p) for p in params if is_sequence_parallel(p)
                               and param_grad(p) is not None], ps.tp_group)
    if ps.pp_size > 1:
        _coalesced_all_reduce([param_grad(p) for p in params if is_shared_embedding(p)
                               and param_grad(p) is not None], ps.embedding_group)
    dp_grads = [g for g in (param_grad(p) for p in params) if g is not None]
    if ps.dp_size > 1:
        _coalesced_all_reduce(dp_grads, ps.dp_group)
        for g in dp_grads:
            g.mul_(1.0 / ps.dp_size)
