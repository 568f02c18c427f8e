"""Global gradient norm across TP, PP and DP, counting every model weight exactly once, and norm clipping.

Which grads count on this rank (`param_counts_toward_norm`):
- TP-split params (tagged with a TP split dim, param_tags.py): on every TP rank (each holds a different slice);
- replicated params (LayerNorm, row-linear biases, position embeddings): only on tp_rank 0, since every TP rank
  holds the same grad (sequence-parallel ones after their TP all-reduce);
- the last stage's copy of the tied word embedding (tagged `embedding_copy`): never, the first stage counts it.
The sum of squares is then all-reduced over ps.mp_group (TP x PP of this replica) and, when each DP rank holds
only its ZeRO shard of the grads, over ps.dp_group too. Without ZeRO every DP rank holds the same reduced grads,
so a DP reduction would count them DP times.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from megagpt.parallel import comm
from megagpt.parallel.param_tags import is_embedding_copy, is_tensor_parallel


def param_counts_toward_norm(param: nn.Parameter, ps) -> bool:
    """True when this rank's grad of `param` is part of the global norm (see module docstring)."""
    if is_embedding_copy(param):
        return False
    return is_tensor_parallel(param) or ps.tp_rank == 0


def param_grad(param: nn.Parameter) -> Optional[torch.Tensor]:
    """The fp32 accumulated grad when a grad buffer exists (`main_grad`), else `.grad`."""
    main = getattr(param, "main_grad", None)
    return main if main is not None else param.grad


def _norm_device(grads: list[torch.Tensor], params: list[nn.Parameter], group) -> torch.device:
    if grads:
        return grads[0].device
    if params:
        return params[0].device
    if dist.get_backend(group) == "nccl":    # a rank without any param still has to join the collective
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def get_grad_norm(params: Iterable[nn.Parameter], ps, grads_for_norm: Optional[list[torch.Tensor]] = None,
                  dp_sharded: bool = False, norm_type: float = 2.0) -> float:
    """Global `norm_type` norm (2 or inf) of the grads of the whole model over every rank.

    `grads_for_norm`: the grads this rank contributes, already filtered with `param_counts_toward_norm` (ZeRO
    passes its owned shards). Default: the filtered `main_grad`/`grad` of `params`.
    `dp_sharded`: the grads are disjoint DP shards (ZeRO), so the reduction also spans ps.dp_group.
    """
    params = list(params)
    if grads_for_norm is None:
        grads_for_norm = [param_grad(p) for p in params
                          if param_counts_toward_norm(p, ps) and param_grad(p) is not None]
    device = _norm_device(grads_for_norm, params, ps.mp_group)
    groups = [ps.mp_group] + ([ps.dp_group] if dp_sharded else [])
    if math.isinf(norm_type):
        total = torch.zeros((), dtype=torch.float32, device=device)
        for g in grads_for_norm:
            if g.numel():
                total = torch.maximum(total, g.detach().abs().max().float())
        for group in groups:
            comm.all_reduce_max(total, group)
        return float(total.item())
    if norm_type != 2.0:
        raise ValueError(f"norm_type must be 2 or inf, got {norm_type}")
    total = torch.zeros((), dtype=torch.float32, device=device)
    if grads_for_norm:
        norms = torch._foreach_norm([g.detach() for g in grads_for_norm], 2.0, dtype=torch.float32)  # fused kernels
        total = torch.stack(norms).square().sum()          # sum of squares of this rank's part
    for group in groups:
        comm.all_reduce(total, group)
    return float(total.sqrt().item())


def get_params_norm(params: Iterable[nn.Parameter], ps) -> float:
    """L2 norm of the model's weights over every rank (--log-params-norm), each weight counted once by the same rule
    as the grad norm: a TP replica or the tied-embedding copy would otherwise count twice. Every DP rank holds the
    whole model, so the sum spans ps.mp_group only."""
    params = list(params)
    return get_grad_norm(params, ps, grads_for_norm=[p.detach() for p in params if param_counts_toward_norm(p, ps)])


def clip_grads_(grads: Iterable[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Scale `grads` in place by max_norm / (total_norm + 1e-6) when that is below 1 (torch and Megatron rule)."""
    coeff = max_norm / (total_norm + 1.0e-6)
    grads = [g for g in grads]
    if coeff < 1.0 and grads:
        torch._foreach_mul_(grads, coeff)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float, ps,
                   grads_for_norm: Optional[list[torch.Tensor]] = None,
                   grads: Optional[list[torch.Tensor]] = None, dp_sharded: bool = False,
                   norm_type: float = 2.0) -> float:
    """Clip every grad of `params` (or `grads`, e.g. ZeRO shards) to a global norm of `max_norm`.

    Returns the global norm before clipping. Non-counted grads (TP replicas, the embedding copy) are scaled too,
    so replicas stay identical.
    """
    params = list(params)
    total = get_grad_norm(params, ps, grads_for_norm=grads_for_norm, dp_sharded=dp_sharded, norm_type=norm_type)
    if grads is None:
        grads = [g for g in (param_grad(p) for p in params) if g is not None]
    clip_grads_(grads, max_norm, total)
    return total
