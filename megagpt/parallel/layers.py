"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

Init contract: every weight is built from ONE deterministic master tensor at full (unsharded) size in fp32, filled
in place by the caller's `init_method`; each rank then copies its own TP slice into its Parameter and the master is
freed. Hence any TP size builds exactly the same model as TP=1, and peak extra memory is one full parameter. The
master lives on the parameter's device: on a GPU no full-size copy passes through host memory (start-up of billions
of parameters in seconds, not minutes), and the values come from the GPU's generator, the same on every TP rank but
not the CPU's values (`--use-cpu-initialization` builds on the CPU, as Megatron's flag does). Biases start at zero.

Sharded parameters are tagged (param_tags.py) with their TP split dim (0 column/vocab rows, 1 row-parallel input
dim). The row-parallel bias under sequence parallelism is tagged `sequence_parallel`: each rank only sees its slice
of the sequence, so its gradient must be all-reduced over TP by the gradient-finalisation code.

Activations are [s, b, h]; under sequence parallelism the tensors entering ColumnParallelLinear and leaving
RowParallelLinear are [s/tp, b, h].

Split backward (zero-bubble pipeline schedules): both linears run through `_LinearWithDeferrableWgrad`, whose
backward computes the input gradient (and bias gradient) at once but, inside `defer_weight_grads()`, queues the
weight gradient `grad_output^T x input` instead of computing it. The queue's `run()` (the schedule's W) later
computes it and feeds it to autograd as if backward had produced it, so the parameter's hooks (the grad buffer's
accumulation into main_grad and bucket readiness) fire then, and not before. Everything else (the TP/SP
collectives, LayerNorm and embedding weight grads) stays in the first pass, B.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megagpt.parallel.param_tags import tag
from megagpt.parallel.mappings import (
    copy_to_tp_region,
    divide,
    gather_from_sequence_parallel_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
    tp_rank,
    tp_world_size,
)

InitMethod = Callable[[torch.Tensor], None]


class WeightGradQueue:
    """Weight-gradient work a backward pass left for later, in the order it was queued; `run()` does it all."""

    def __init__(self) -> None:
        self._work: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []   # (weight, grad_output, input)

    def add(self, weight: torch.Tensor, grad_output: torch.Tensor, x: torch.Tensor) -> None:
        self._work.append((weight, grad_output, x))

    def __len__(self) -> int:
        return len(self._work)

    def run(self) -> None:
        """Compute every queued weight gradient and accumulate it through autograd (so the parameter's grad
        hooks fire, as they would have in an undivided backward). One at a time: peak extra memory is one grad."""
        work, self._work = self._work, []
        for weight, grad_output, x in work:
            torch.autograd.backward(weight, grad_tensors=_weight_grad(grad_output, x))


_QUEUE: Optional[WeightGradQueue] = None   # where linear backwards put weight grads; None: compute them at once


@contextlib.contextmanager
def defer_weight_grads() -> Iterator[WeightGradQueue]:
    """Backward passes run inside leave the linear layers' weight gradients in the yielded queue (the W of a
    zero-bubble schedule). A module variable, not a thread-local: autograd runs device backward on its own thread."""
    global _QUEUE
    previous, _QUEUE = _QUEUE, WeightGradQueue()
    try:
        yield _QUEUE
    finally:
        _QUEUE = previous


def _weight_grad(grad_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW = grad_output^T x over every token: [*, out], [*, in] -> [out, in]."""
    return grad_output.reshape(-1, grad_output.size(-1)).t().matmul(x.reshape(-1, x.size(-1)))  # [out, in]


class _LinearWithDeferrableWgrad(torch.autograd.Function):
    """y = x W^T + b whose weight gradient can be deferred (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        # The W step must feed the parameter itself to autograd: under saved-tensor hooks (activation offloading,
        # the trainer's activation-byte measurement) ctx.saved_tensors may return another tensor object for it,
        # and a gradient "accumulated" into that one would be lost.
        ctx.weight_leaf = weight if weight.grad_fn is None else None
        return F.linear(x, weight, bias)  # [*, out]

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        grad_x = grad_output.matmul(weight) if ctx.needs_input_grad[0] else None  # [*, in]
        grad_bias = grad_output.reshape(-1, grad_output.size(-1)).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] \
            else None  # [out]
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # Only a leaf weight can be fed to autograd later: a weight computed by other ops (a cast, say) has
            # its graph freed by then, so its gradient is computed now.
            if _QUEUE is not None and ctx.weight_leaf is not None:
                _QUEUE.add(ctx.weight_leaf, grad_output, x)
            else:
                grad_weight = _weight_grad(grad_output, x)  # [out, in]
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear with a weight gradient that `defer_weight_grads` can postpone: [*, in] -> [*, out]."""
    return _LinearWithDeferrableWgrad.apply(x, weight, bias)


def _sharded_param(full_shape: tuple[int, ...], partition_dim: Optional[int], group, init_method: InitMethod,
                   params_dtype: torch.dtype, device) -> nn.Parameter:
    """Build the full fp32 master on the parameter's device, fill it with `init_method`, keep this rank's slice
    along `partition_dim`. `partition_dim=None` keeps the whole tensor (replicated parameter). On the meta device
    (counting parameters without memory) nothing is filled."""
    device = torch.device(device if device is not None else "cpu")
    master = torch.empty(full_shape, dtype=torch.float32, device=device)
    if device.type != "meta":
        init_method(master)
    if partition_dim is None:
        shard = master
    else:
        size = divide(full_shape[partition_dim], tp_world_size(group), f"dim {partition_dim} of {full_shape}:")
        shard = master.narrow(partition_dim, tp_rank(group) * size, size)
    param = nn.Parameter(torch.empty(shard.shape, dtype=params_dtype, device=device))
    with torch.no_grad():
        param.copy_(shard)
    del master, shard
    tag(param, tp_split_dim=partition_dim)
    return param


def _zero_bias(size: int, params_dtype: torch.dtype, device, is_parallel: bool) -> nn.Parameter:
    bias = nn.Parameter(torch.zeros(size, dtype=params_dtype, device=device))
    tag(bias, tp_split_dim=0 if is_parallel else None)
    return bias


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split by rows (output features): rank r owns output columns [r*out/tp, (r+1)*out/tp).

    Input path: f (copy_to_tp_region), or an all-gather along s under sequence parallelism. The output stays
    split ([s, b, out/tp]) unless `gather_output`. With `skip_bias_add` the bias (this rank's shard) is returned
    instead of added, so the caller can fuse it. `skip_weight_param_allocation` lets a tied weight (e.g. the
    word embedding used as LM head) be passed to forward instead.
    """

    def __init__(self, input_size: int, output_size: int, group, *, init_method: InitMethod, bias: bool = True,
                 gather_output: bool = False, skip_bias_add: bool = False, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, device=None,
                 skip_weight_param_allocation: bool = False) -> None:
        super().__init__()
        self.input_size, self.output_size, self.group = input_size, output_size, group
        self.tp_size = tp_world_size(group)
        self.output_size_per_partition = divide(output_size, self.tp_size, "ColumnParallelLinear output_size")
        self.gather_output, self.skip_bias_add, self.sequence_parallel = gather_output, skip_bias_add, sequence_parallel
        if skip_weight_param_allocation:
            self.weight = None
        else:
            self.weight = _sharded_param((output_size, input_size), 0, group, init_method, params_dtype, device)
        self.bias = _zero_bias(self.output_size_per_partition, params_dtype, device, True) if bias else None

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: [s, b, in] ([s/tp, b, in] under sequence parallel) -> ([s, b, out/tp] or [s, b, out], bias or None)."""
        if weight is None:
            if self.weight is None:
                raise ValueError("ColumnParallelLinear was built with skip_weight_param_allocation: pass weight=")
            weight = self.weight
        expected = (self.output_size_per_partition, self.input_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight shape {tuple(weight.shape)} != expected per-rank {expected}")
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.group)  # [s/tp, b, in] -> [s, b, in]
        else:
            x = copy_to_tp_region(x, self.group)  # [s, b, in]
        bias = None if self.skip_bias_add else self.bias
        out = linear(x, weight, bias)  # [s, b, out/tp]
        if self.gather_output:
            out = gather_from_tp_region(out, self.group)  # [s, b, out]
        return out, (self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size} (tp={self.tp_size}: "
                f"out/tp={self.output_size_per_partition}), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split by columns (input features): rank r owns inputs [r*in/tp, (r+1)*in/tp).

    Each rank computes a partial sum of the full output; g (all-reduce) completes it, or a reduce-scatter along
    s under sequence parallelism. The (replicated) bias is added after the reduction, or returned when
    `skip_bias_add`.
    """

    def __init__(self, input_size: int, output_size: int, group, *, init_method: InitMethod, bias: bool = True,
                 input_is_parallel: bool = True, skip_bias_add: bool = False, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear with sequence_parallel needs input_is_parallel=True")
        self.input_size, self.output_size, self.group = input_size, output_size, group
        self.tp_size = tp_world_size(group)
        self.input_size_per_partition = divide(input_size, self.tp_size, "RowParallelLinear input_size")
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        self.sequence_parallel = sequence_parallel
        self.weight = _sharded_param((output_size, input_size), 1, group, init_method, params_dtype, device)
        if bias:
            self.bias = _zero_bias(output_size, params_dtype, device, False)
            tag(self.bias, sequence_parallel=sequence_parallel)
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: [s, b, in/tp] ([s, b, in] if not input_is_parallel) -> ([s, b, out] or [s/tp, b, out], bias or None)."""
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.group)  # [s, b, in] -> [s, b, in/tp]
        partial = linear(x, self.weight)  # [s, b, out], partial sum over this rank's inputs
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(partial, self.group)  # [s/tp, b, out]
        else:
            out = reduce_from_tp_region(partial, self.group)  # [s, b, out]
        if self.skip_bias_add:
            return out, self.bias
        if self.bias is not None:
            out = out + self.bias
        return out, None

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size} (tp={self.tp_size}: "
                f"in/tp={self.input_size_per_partition}), bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; rank r owns ids [r*V/tp, (r+1)*V/tp).

    Each rank looks up the ids it owns, writes zeros for the others, and g (all-reduce) sums the partial
    results, so every rank ends with the full embedding of every id.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group, *, init_method: InitMethod,
                 params_dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.group = num_embeddings, embedding_dim, group
        self.tp_size = tp_world_size(group)
        if num_embeddings % self.tp_size != 0:
            raise ValueError(f"VocabParallelEmbedding: num_embeddings {num_embeddings} is not divisible by the "
                             f"tensor-parallel size {self.tp_size}; pad it with pad_vocab_size() first")
        self.num_embeddings_per_partition = num_embeddings // self.tp_size
        self.vocab_start_index = tp_rank(group) * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = _sharded_param((num_embeddings, embedding_dim), 0, group, init_method, params_dtype, device)

    def forward(self, ids: torch.Tensor, reduce_output: bool = True) -> torch.Tensor:
        """ids: [b, s] global vocabulary ids -> [b, s, h]. With reduce_output=False the caller gets this rank's
        partial sum (rows it does not own are zero) and reduces it itself, e.g. by a sequence-parallel
        reduce-scatter that sends half the bytes of an all-reduce."""
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)  # [b, s, h]
        outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)  # [b, s]
        local_ids = (ids - self.vocab_start_index).masked_fill(outside, 0)  # [b, s]
        partial = F.embedding(local_ids, self.weight)  # [b, s, h]
        partial = partial.masked_fill(outside.unsqueeze(-1), 0.0)  # [b, s, h], zero rows this rank does not own
        return reduce_from_tp_region(partial, self.group) if reduce_output else partial  # [b, s, h]

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim} (tp={self.tp_size}: "
                f"vocab/tp={self.num_embeddings_per_partition}, rows [{self.vocab_start_index}, "
                f"{self.vocab_end_index}))")
