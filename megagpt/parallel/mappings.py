"""Autograd collectives over the tensor-parallel (TP) group: the f and g operators of the Megatron paper.

Activations are laid out [s, b, h] (sequence first), so sequence-parallel (SP) collectives act on dim 0 and
tensor-parallel splits of the hidden dimension act on the last dim. Every function takes `(x, group)` and is
differentiable: its backward is the adjoint collective (all-reduce <-> identity, split <-> all-gather,
reduce-scatter <-> all-gather). Raw communication goes through `megagpt.parallel.comm`.

A group of size 1 (or `group=None` before torch.distributed is initialised) makes every function the identity
with no communication and no autograd node, so the same model code runs unsharded.

Outputs never alias a collective's input buffer: forward and backward allocate fresh tensors, because an
autograd gradient may be shared by several consumers and an in-place all-reduce would corrupt the others.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megagpt.parallel import comm


def tp_world_size(group: Optional[object]) -> int:
    """Size of `group`; 1 when `group` is None and torch.distributed is not initialised (single process)."""
    if group is None and not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def tp_rank(group: Optional[object]) -> int:
    """This process's rank within `group`; 0 when `group` is None and torch.distributed is not initialised."""
    if group is None and not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """Exact integer division that names the numbers when a dimension cannot be split evenly."""
    if numerator % denominator != 0:
        raise ValueError(f"{what} {numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


# ---------------------------------------------------------------------------------------------------------
# Plain (non-autograd) primitives. All assume a group of size > 1.
# ---------------------------------------------------------------------------------------------------------

def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's contiguous chunk of `x` along `dim` (no communication)."""
    n = tp_world_size(group)
    chunk = divide(x.size(dim), n, f"dim {dim} of shape {tuple(x.shape)}:")
    return x.narrow(dim, tp_rank(group) * chunk, chunk).contiguous()


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks into a fresh tensor (the input is left untouched)."""
    out = x.clone(memory_format=torch.contiguous_format)
    comm.all_reduce(out, group)
    return out


def _gather_first(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0."""
    n = tp_world_size(group)
    x = x.contiguous()
    out = torch.empty((n * x.size(0),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    comm.all_gather_into(out, x, group)
    return out


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's `x` along the last dim, via a dim-0 all-gather and re-chunking."""
    n = tp_world_size(group)
    stacked = _gather_first(x, group)  # [n * d0, ..., h/tp]: rank r's tensor is the r-th dim-0 chunk
    return torch.cat(stacked.chunk(n, dim=0), dim=-1).contiguous()  # [d0, ..., h]


def _reduce_scatter_first(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks and keep this rank's dim-0 chunk."""
    n = tp_world_size(group)
    rows = divide(x.size(0), n, f"dim 0 of shape {tuple(x.shape)}:")
    out = torch.empty((rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    comm.reduce_scatter_into(out, x.contiguous(), group)
    return out


# ---------------------------------------------------------------------------------------------------------
# Autograd functions.
# ---------------------------------------------------------------------------------------------------------

class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_first(grad, ctx.group), None, None
        return _split(grad, 0, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad, ctx.group), None


# ---------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------

def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Megatron's f operator: identity forward, all-reduce of the gradient backward (enters a TP region)."""
    if tp_world_size(group) == 1:
        return x
    return _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Megatron's g operator: all-reduce forward, identity backward (leaves a TP region)."""
    if tp_world_size(group) == 1:
        return x
    return _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's chunk of the last dim; backward all-gathers the gradient along the last dim."""
    if tp_world_size(group) == 1:
        return x
    return _ScatterToTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the last dim; backward keeps this rank's chunk of the gradient."""
    if tp_world_size(group) == 1:
        return x
    return _GatherFromTP.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's chunk of dim 0 (sequence); backward all-gathers the gradient along dim 0."""
    if tp_world_size(group) == 1:
        return x
    return _ScatterToSP.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group,
                                         tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """All-gather along dim 0 (sequence) before a TP region; the SP counterpart of f.

    Backward reduce-scatters the gradient along dim 0 when the consumer is tensor-parallel (each rank holds a
    partial gradient of the full sequence), else just keeps this rank's chunk (the gradient is replicated).
    """
    if tp_world_size(group) == 1:
        return x
    return _GatherFromSP.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Reduce-scatter along dim 0 (sequence) after a TP region, the SP counterpart of g; backward all-gathers."""
    if tp_world_size(group) == 1:
        return x
    return _ReduceScatterToSP.apply(x, group)
