"""Raw collectives: the one place that papers over backend and torch-version differences and counts bytes.

Callers never touch torch.distributed collectives directly; they use these wrappers so that
(a) torch's renames (2.13: `all_gather_single` / `reduce_scatter_single` for `all_gather_into_tensor` /
    `reduce_scatter_tensor`) and NCCL's batched p2p are handled here, not in every caller, and
(b) `count_bytes()` can count the algorithmic volume of a training step's collectives (bench/comm_volume.py), and
(c) every call is entered in the collective ledger (diagnostics/ledger.py) before it reaches the backend, so a hang
    can be traced to the rank that never arrived (diagnostics/forensics.py).
Groups of size 1 short-circuit without any call.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megagpt.diagnostics.ledger import LEDGER

_active_counters: list[Counter] = []

@contextlib.contextmanager
def count_bytes() -> Iterator[Counter]:
    """Count bytes this rank sends per collective kind while the context is open (ring-algorithm volume)."""
    counter: Counter = Counter()
    _active_counters.append(counter)
    try:
        yield counter
    finally:
        _active_counters.remove(counter)


def _record(kind: str, nbytes: float) -> None:
    for counter in _active_counters:
        counter[kind] += int(nbytes)


def _logged(op: str, group, tensor: torch.Tensor, async_op: bool, call: Callable[[], object]):
    """Run `call` between the ledger's begin and end; a fault-injection skip (tests only) returns None."""
    entry = LEDGER.begin(op, group, tensor, async_op)
    if entry is None:
        return None
    work = call()
    LEDGER.end(entry)
    return work


def group_size(group) -> int:
    return dist.get_world_size(group)


def all_reduce(tensor: torch.Tensor, group, async_op: bool = False):
    """Sum `tensor` in place over `group`; returns a work handle when async_op."""
    n = group_size(group)
    if n == 1:
        return None
    _record("all_reduce", 2 * (n - 1) / n * tensor.numel() * tensor.element_size())
    return _logged("all_reduce", group, tensor, async_op,
                   lambda: dist.all_reduce(tensor, group=group, async_op=async_op))


def _flat_collective(new_name: str, old_name: str):
    """The flat-tensor collective under this torch's name (looked up per call, so instrumentation sees it).
    gloo and NCCL both run it; only the name differs between torch versions."""
    return getattr(dist, new_name, None) or getattr(dist, old_name)


def all_gather_into(output: torch.Tensor, input_: torch.Tensor, group, async_op: bool = False):
    """Concatenate every rank's `input_` along dim 0 into `output` (size n * input.size(0))."""
    n = group_size(group)
    if n == 1:
        output.copy_(input_)
        return None
    _record("all_gather", (n - 1) * input_.numel() * input_.element_size())
    gather = _flat_collective("all_gather_single", "all_gather_into_tensor")
    return _logged("all_gather", group, input_, async_op,
                   lambda: gather(output, input_.contiguous(), group=group, async_op=async_op))


def reduce_scatter_into(output: torch.Tensor, input_: torch.Tensor, group, async_op: bool = False):
    """Sum `input_` over ranks and keep this rank's dim-0 chunk in `output` (size input.size(0) / n)."""
    n = group_size(group)
    if n == 1:
        output.copy_(input_)
        return None
    _record("reduce_scatter", (n - 1) * output.numel() * output.element_size())
    scatter = _flat_collective("reduce_scatter_single", "reduce_scatter_tensor")
    return _logged("reduce_scatter", group, input_, async_op,
                   lambda: scatter(output, input_.contiguous(), group=group, async_op=async_op))


def broadcast(tensor: torch.Tensor, src: int, group, async_op: bool = False):
    """Broadcast from global rank `src` to `group`."""
    if group_size(group) == 1:
        return None
    _record("broadcast", tensor.numel() * tensor.element_size() if dist.get_rank() == src else 0)
    return _logged("broadcast", group, tensor, async_op,
                   lambda: dist.broadcast(tensor, src=src, group=group, async_op=async_op))


def all_reduce_max(tensor: torch.Tensor, group) -> None:
    n = group_size(group)
    if n > 1:
        _record("all_reduce_max", 2 * (n - 1) / n * tensor.numel() * tensor.element_size())
        _logged("all_reduce_max", group, tensor, False,
                lambda: dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group))


def all_gather_bytes(payload: bytes, group, device: torch.device) -> list[bytes]:
    """Every rank's `payload` (any length), on every rank of `group`, in group-rank order: small metadata such as
    JSON, padded to the longest and gathered as uint8 rows (works on gloo and NCCL alike; no pickling)."""
    n = group_size(group)
    if n == 1:
        return [payload]
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    all_reduce_max(length, group)
    row = torch.zeros(max(int(length.item()), 1), dtype=torch.uint8, device=device)
    row[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if payload else 0
    rows = torch.empty(row.numel() * n, dtype=torch.uint8, device=device)
    all_gather_into(rows, row, group)
    return [part.numpy().tobytes().rstrip(b"\x00") for part in rows.cpu().chunk(n)]


def batch_send_recv(ops: list[tuple[str, torch.Tensor, int]], group: Optional[object] = None) -> None:
    """Run point-to-point ops [("send"|"recv", tensor, peer_global_rank)] together and wait for all.

    Uses batch_isend_irecv where the backend supports it; otherwise plain isend/irecv.
    """
    if not ops:
        return
    for kind, tensor, _ in ops:
        if kind == "send":
            _record("p2p", tensor.numel() * tensor.element_size())
    entries = [LEDGER.begin_p2p(kind, t, peer) for kind, t, peer in ops]
    p2p = [dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, peer, group=group) for kind, t, peer in ops]
    nccl = dist.get_backend(group) == "nccl"
    works = dist.batch_isend_irecv(p2p) if nccl else [op.op(op.tensor, op.peer, group=op.group) for op in p2p]
    for w, entry in zip(works, entries):
        w.wait()   # under NCCL: orders the current stream after the transfer (no device-wide sync, which would
        LEDGER.end(entry)   # also wait for the DP bucket reductions in flight and lose their overlap)
