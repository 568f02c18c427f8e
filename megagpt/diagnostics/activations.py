"""Bytes autograd keeps for backward: run a callable under saved-tensor hooks and count unique storages.

Why storages, not tensors: autograd often saves views (q, k and v are views of one QKV output; a transposed
weight is a view of the parameter), and what occupies memory is each underlying storage once, at its full size.
Why exclude: weights are saved by every linear layer but are not activations; pass their tensors in `exclude` so
what remains is the activation memory a micro-batch holds between its forward and its backward (what the
planner's activation terms predict, megagpt/plan/memory.py).

Generic on purpose: it knows no model and no process group.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch


@dataclass
class SavedBytes:
    """Unique storages saved for backward: total bytes, and bytes per dtype (to tell masks from activations)."""

    total: int = 0
    by_dtype: Counter = field(default_factory=Counter)
    storages: int = 0


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    st = t.untyped_storage()
    return (str(t.device), st.data_ptr())


def saved_tensor_bytes(fn: Callable[..., Any], *args: Any, exclude: Iterable[torch.Tensor] = (),
                       **kwargs: Any) -> tuple[Any, SavedBytes]:
    """Call `fn(*args, **kwargs)` and return (its result, the bytes of unique storages saved for backward),
    leaving out storages shared with any tensor of `exclude` (the parameters). The result keeps the graph alive,
    so the caller can still run backward."""
    skip = {_storage_key(t) for t in exclude}
    seen: dict[tuple[str, int], tuple[int, torch.dtype]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in skip and key[1] != 0:
            seen.setdefault(key, (t.untyped_storage().nbytes(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn(*args, **kwargs)
    report = SavedBytes(storages=len(seen))
    for nbytes, dtype in seen.values():
        report.total += nbytes
        report.by_dtype[str(dtype).replace("torch.", "")] += nbytes
    return result, report


def measure_first_calls(fn: Callable[..., Any], store: dict[Any, int],
                        exclude: Callable[[Any], Iterable[torch.Tensor]]) -> Callable[..., Any]:
    """`fn(key, *args)`, except that the first call for each `key` not yet in `store` runs under saved-tensor hooks
    and records its saved bytes (leaving out `exclude(key)`, the parameters) in store[key]; later calls run bare.

    Why a wrapper: the trainer measures one real micro-batch per model chunk during its first step (no extra
    forward pass), and every later step pays one dict lookup."""
    def call(key: Any, *args: Any) -> Any:
        if key in store:
            return fn(key, *args)
        result, saved = saved_tensor_bytes(fn, key, *args, exclude=list(exclude(key)))
        store[key] = saved.total
        return result
    return call
