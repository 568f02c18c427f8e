"""How a parameter is sharded and which extra gradient reductions it needs: one typed record per parameter.

Read by grad finalisation (optim/grad_buffer.py), the grad norm (optim/clip.py) and checkpoints (tensor metadata).
A tag is set with `tag(param, field=value)`, which rejects unknown field names, and read through the accessors
below, so a misspelt tag is an error instead of a silent False.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ParamTag:
    """Sharding and reduction facts of one parameter (defaults: replicated over TP, DP-reduced only)."""

    tp_split_dim: Optional[int] = None   # TP-split along this dim (0 column/vocab rows, 1 row-parallel input), or None
    sequence_parallel: bool = False      # saw only its sequence slice under SP: grads all-reduced over TP
    shared_embedding: bool = False       # tied word embedding on first/last stage: grads all-reduced over those
    embedding_copy: bool = False         # the last stage's copy of the tied embedding: left out of the grad norm


_ATTRIBUTE = "_megagpt_param_tag"


def tag(param: torch.Tensor, **fields) -> torch.Tensor:
    """Set tag fields on `param` (others keep their values); returns `param`."""
    setattr(param, _ATTRIBUTE, dataclasses.replace(tags_of(param), **fields))
    return param


def tags_of(param: torch.Tensor) -> ParamTag:
    return getattr(param, _ATTRIBUTE, ParamTag())


def tp_split_dim(param: torch.Tensor) -> Optional[int]:
    return tags_of(param).tp_split_dim


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return tags_of(param).tp_split_dim is not None


def is_sequence_parallel(param: torch.Tensor) -> bool:
    return tags_of(param).sequence_parallel


def is_shared_embedding(param: torch.Tensor) -> bool:
    return tags_of(param).shared_embedding


def is_embedding_copy(param: torch.Tensor) -> bool:
    return tags_of(param).embedding_copy
