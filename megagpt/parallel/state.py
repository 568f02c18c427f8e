"""Process groups for tensor (TP), pipeline (PP) and data (DP) parallelism: the only place groups are built.

Rank order follows Megatron: TP varies fastest, then DP, then PP::

    rank = tp_rank + TP * (dp_rank + DP * pp_rank)

Worked layout, 8 ranks with TP=2, PP=2, DP=2::

    TP groups        [0,1] [2,3] [4,5] [6,7]       (contiguous: same node on a cluster)
    DP groups        [0,2] [1,3] [4,6] [5,7]
    PP groups        [0,4] [1,5] [2,6] [3,7]       (stage 0 holds ranks 0-3, stage 1 ranks 4-7)
    model-parallel   [0,1,4,5] [2,3,6,7]           (TP x PP for one DP replica: grad-norm reduction)
    embedding        [0,4] [1,5] [2,6] [3,7]       (first + last stage: tied word-embedding grads)

Under the ZB-V schedule the first and the last virtual stage both live on pipeline rank 0 (see `config.virtual_stage`), so
the tied embedding is one parameter there and each embedding group is that one rank: nothing to all-reduce.

`ParallelLayout` is the pure rank arithmetic (unit-tested without processes); `ParallelState` creates the
torch.distributed groups from it and is passed explicitly (no module-level global), so one process can hold
several layouts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from megagpt.config import layout_problems, v_shaped


class ParallelConfigError(ValueError):
    """A parallel layout that cannot be built from the given sizes."""


def check_sizes(world_size: int, tp: int, pp: int, virtual_pp: Optional[int] = None) -> None:
    """Raise a ParallelConfigError naming the numbers when world = TP x PP x DP is impossible."""
    problems = layout_problems(tp, pp, world_size=world_size, virtual_chunks=virtual_pp or 1)
    if problems:
        raise ParallelConfigError("; ".join(problems))


@dataclass(frozen=True)
class ParallelLayout:
    """Pure rank arithmetic of a TP x PP x DP layout (no processes involved)."""

    world_size: int
    tp: int
    pp: int
    v_shape: bool = False   # ZB-V placement: first and last virtual stage on pipeline rank 0

    def __post_init__(self) -> None:
        check_sizes(self.world_size, self.tp, self.pp)

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank."""
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def model_parallel_groups(self) -> list[list[int]]:
        return [sorted(self.rank(t, d, p) for p in range(self.pp) for t in range(self.tp)) for d in range(self.dp)]

    def embedding_groups(self) -> list[list[int]]:
        """First and last stage of every pipeline (one rank when PP == 1, or under the V placement)."""
        return [sorted({g[0], g[0] if self.v_shape else g[-1]}) for g in self.pp_groups()]


def _group_containing(rank: int, groups: list[list[int]], required: bool = True):
    """Create every group (new_group is collective over the world) and return the one holding `rank`.

    Middle pipeline stages belong to no embedding group: they get (None, []) when `required` is False.
    """
    mine = (None, []) if not required else None
    for ranks in groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = (group, ranks)
    assert mine is not None, f"rank {rank} is in no group of {groups}"
    return mine


class ParallelState:
    """Process groups and rank getters of one TP x PP x DP layout over the initialised default group."""

    def __init__(self, tp: int = 1, pp: int = 1, virtual_pp: Optional[int] = None,
                 pipeline_schedule: Optional[str] = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call megagpt.parallel.launch.init_distributed()")
        world_size, rank = dist.get_world_size(), dist.get_rank()
        check_sizes(world_size, tp, pp, virtual_pp)
        self.layout = ParallelLayout(world_size, tp, pp, v_shaped(pipeline_schedule))
        self.rank = rank
        self.virtual_pp_size = virtual_pp or 1
        self.pipeline_schedule = pipeline_schedule
        self.tp_rank, self.dp_rank, self.pp_rank = self.layout.coords(rank)
        self.tp_group, self.tp_ranks = _group_containing(rank, self.layout.tp_groups())
        self.dp_group, self.dp_ranks = _group_containing(rank, self.layout.dp_groups())
        self.pp_group, self.pp_ranks = _group_containing(rank, self.layout.pp_groups())
        self.mp_group, self.mp_ranks = _group_containing(rank, self.layout.model_parallel_groups())
        self.embedding_group, self.embedding_ranks = _group_containing(rank, self.layout.embedding_groups(),
                                                                       required=False)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def pp_size(self) -> int:
        return self.layout.pp

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def v_shape(self) -> bool:
        """Model chunks are placed in a V (ZB-V): see `config.virtual_stage`."""
        return self.layout.v_shape

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Holds the last virtual stage (final norm, LM head, loss): the last rank, or rank 0 under the V placement."""
        return self.pp_rank == self._loss_pp_rank

    @property
    def next_rank(self) -> int:
        """Global rank of the next pipeline stage (wraps around)."""
        return self.pp_ranks[(self.pp_rank + 1) % self.pp_size]

    @property
    def prev_rank(self) -> int:
        """Global rank of the previous pipeline stage (wraps around)."""
        return self.pp_ranks[(self.pp_rank - 1) % self.pp_size]

    @property
    def tp_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group (broadcast source for data)."""
        return self.tp_ranks[0]

    @property
    def last_stage_rank(self) -> int:
        """Global rank of the last stage of this rank's pipeline (where the loss lives)."""
        return self.pp_ranks[self._loss_pp_rank]

    @property
    def _loss_pp_rank(self) -> int:
        return 0 if self.v_shape else self.pp_size - 1

    def __repr__(self) -> str:
        return (f"ParallelState(rank={self.rank}, tp={self.tp_rank}/{self.tp_size}, dp={self.dp_rank}/{self.dp_size}, "
                f"pp={self.pp_rank}/{self.pp_size}, virtual_pp={self.virtual_pp_size})")
