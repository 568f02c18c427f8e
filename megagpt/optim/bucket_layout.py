"""Where each gradient lives in the grad buffer: the bucket arithmetic alone, on plain integers (no torch).

Why its own module: the grad buffer (grad_buffer.py) allocates exactly this layout, and the planner
(megagpt/plan) predicts its bytes (bucket padding, ZeRO shard sizes, one Adam slot per owned piece of a parameter)
before anything is allocated. One function serves both, so the prediction cannot drift from the allocation.

Rules (grad_buffer.py's docstring says why): parameters in reverse registration order (backward order), grouped
by reduction kind in the order of `kinds_order`; a bucket closes once it holds >= `bucket_size` elements (a
parameter never straddles two buckets); each bucket is padded to a multiple of `align * dp_size`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

# Reduction kinds, in buffer order: plain DP buckets first; params pre-reduced over TP (sequence-parallel replicated
# params) or over the embedding group (tied word embedding, PP > 1) in buckets of their own at the end.
KIND_DP, KIND_TP_SYNC, KIND_EMBEDDING_SYNC = "dp", "tp_sync", "embedding_sync"
KIND_ORDER = (KIND_DP, KIND_TP_SYNC, KIND_EMBEDDING_SYNC)
BUCKET_ALIGN = 64  # elements; shard starts aligned to 256 B (fp32 grads) / 128 B (bf16 params) for NCCL's fast path


@dataclass(frozen=True)
class BucketSpan:
    """One bucket: its reduction kind, the indices of its params (backward order), and [start, end) padded."""

    kind: str
    params: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class BucketLayout:
    """Buckets in buffer order, and each parameter's unpadded [start, end) in the buffer (by input index)."""

    buckets: tuple[BucketSpan, ...]
    param_range: dict[int, tuple[int, int]]

    @property
    def numel(self) -> int:
        """Buffer elements including padding (a multiple of dp_size)."""
        return self.buckets[-1].end if self.buckets else 0

    def owned_pieces(self, dp_size: int, dp_rank: int) -> list[tuple[int, int, int]]:
        """(param index, first, last) element ranges of each parameter inside DP rank `dp_rank`'s 1/DP slice of
        every bucket: what a ZeRO rank holds fp32 masters and Adam moments for (one optimizer slot each)."""
        pieces = []
        for b in self.buckets:
            shard = b.numel // dp_size
            own_lo, own_hi = b.start + dp_rank * shard, b.start + (dp_rank + 1) * shard
            for i in sorted(b.params, key=lambda j: self.param_range[j][0]):
                lo, hi = self.param_range[i]
                s, e = max(lo, own_lo), min(hi, own_hi)
                if s < e:
                    pieces.append((i, s - lo, e - lo))
        return pieces


def bucket_layout(numels: Sequence[int], kinds: Sequence[str], dp_size: int, bucket_size: Optional[int],
                  kinds_order: Sequence[str] = KIND_ORDER, align: int = BUCKET_ALIGN) -> BucketLayout:
    """The buffer layout of parameters with `numels[i]` elements and reduction kind `kinds[i]`, given in
    registration order (see the module docstring for the rules)."""
    if len(numels) != len(kinds):
        raise ValueError(f"bucket_layout: {len(numels)} sizes but {len(kinds)} kinds")
    multiple = align * dp_size
    buckets: list[BucketSpan] = []
    param_range: dict[int, tuple[int, int]] = {}
    offset = 0

    def close(kind: str, members: list[int], start: int, end: int) -> int:
        padded = start + -(-(end - start) // multiple) * multiple
        buckets.append(BucketSpan(kind, tuple(members), start, padded))
        return padded

    for kind in kinds_order:
        members: list[int] = []
        start = offset
        for i in reversed(range(len(numels))):               # backward order
            if kinds[i] != kind:
                continue
            param_range[i] = (offset, offset + numels[i])
            offset += numels[i]
            members.append(i)
            if bucket_size is not None and offset - start >= bucket_size:
                offset = close(kind, members, start, offset)
                members, start = [], offset
        if members:
            offset = close(kind, members, start, offset)
    return BucketLayout(tuple(buckets), param_range)
