"""ParallelLayout rank arithmetic (no processes) and one ParallelState built on 4 gloo ranks."""
from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from megagpt.parallel import comm, state
from megagpt.parallel.state import ParallelConfigError, ParallelLayout, ParallelState, check_sizes

LAYOUTS = [(1, 1, 1), (8, 2, 2), (8, 1, 8), (8, 8, 1), (8, 4, 1), (16, 2, 4), (12, 3, 2), (24, 2, 3), (6, 1, 3)]


def _docstring_groups(kind: str) -> list[list[int]]:
    """Groups listed on the `kind` line of state.py's worked 8-rank example."""
    line = next(l for l in state.__doc__.splitlines() if l.strip().startswith(kind))
    return [[int(v) for v in g.split(",")] for g in re.findall(r"\[([\d,]+)\]", line)]


def test_worked_example_tp2_pp2_dp2():
    layout = ParallelLayout(world_size=8, tp=2, pp=2)
    assert layout.dp == 2
    assert layout.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.model_parallel_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert layout.embedding_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize("kind, method", [("TP groups", "tp_groups"), ("DP groups", "dp_groups"),
                                          ("PP groups", "pp_groups"), ("model-parallel", "model_parallel_groups"),
                                          ("embedding", "embedding_groups")])
def test_docstring_example_matches_code(kind, method):
    """The worked layout in state.py's docstring is what the code builds (doc and code cannot drift)."""
    assert getattr(ParallelLayout(8, 2, 2), method)() == _docstring_groups(kind)


@pytest.mark.parametrize("world, tp, pp", LAYOUTS)
def test_rank_and_coords_are_inverse_megatron_order(world, tp, pp):
    layout = ParallelLayout(world, tp, pp)
    dp = world // (tp * pp)
    assert layout.dp == dp
    seen = []
    for p, d, t in itertools.product(range(pp), range(dp), range(tp)):  # TP fastest, then DP, then PP
        rank = layout.rank(t, d, p)
        assert rank == t + tp * (d + dp * p) == len(seen)
        assert layout.coords(rank) == (t, d, p)
        seen.append(rank)
    assert seen == list(range(world))


@pytest.mark.parametrize("world, tp, pp", LAYOUTS)
def test_groups_partition_the_world(world, tp, pp):
    layout = ParallelLayout(world, tp, pp)
    for groups, size in ((layout.tp_groups(), tp), (layout.dp_groups(), layout.dp), (layout.pp_groups(), pp),
                         (layout.model_parallel_groups(), tp * pp)):
        assert all(len(g) == size for g in groups)
        assert sorted(r for g in groups for r in g) == list(range(world))  # every rank in exactly one group
    for g in layout.tp_groups():
        assert g == list(range(g[0], g[0] + tp))  # contiguous ranks: one node on a cluster
    for rank in range(world):
        t, d, p = layout.coords(rank)
        tp_group = next(g for g in layout.tp_groups() if rank in g)
        dp_group = next(g for g in layout.dp_groups() if rank in g)
        pp_group = next(g for g in layout.pp_groups() if rank in g)
        assert [layout.coords(r)[1:] for r in tp_group] == [(d, p)] * tp  # same DP replica and stage
        assert [layout.coords(r)[0::2] for r in dp_group] == [(t, p)] * layout.dp  # same TP slice and stage
        assert [layout.coords(r)[2] for r in pp_group] == list(range(pp))  # one rank per stage, in order
        emb = [g for g in layout.embedding_groups() if rank in g]
        if p in (0, pp - 1):  # first and last stage share the tied word embedding
            assert emb == [sorted({pp_group[0], pp_group[-1]})]
        else:  # middle stages hold no embedding
            assert emb == []


def test_embedding_group_is_single_rank_without_pipeline():
    assert ParallelLayout(4, 2, 1).embedding_groups() == [[0], [1], [2], [3]]


@pytest.mark.parametrize("world, tp, pp, virtual, needles", [
    (6, 4, 1, None, ["6", "4", "= 4"]),
    (8, 2, 3, None, ["8", "2 x", "3 = 6"]),
    (4, 0, 1, None, ["tensor-model-parallel-size", "0"]),
    (4, 1, -1, None, ["pipeline-model-parallel-size", "-1"]),
    (0, 1, 1, None, ["world size", "0"]),
    (4, 2, 1, 2, ["interleaving", "(2 model chunks per rank)", "> 1"]),
])
def test_bad_sizes_raise_with_the_numbers(world, tp, pp, virtual, needles):
    with pytest.raises(ParallelConfigError) as info:
        check_sizes(world, tp, pp, virtual)
    assert all(n in str(info.value) for n in needles), str(info.value)
    if virtual is None:
        with pytest.raises(ParallelConfigError):
            ParallelLayout(world, tp, pp)


def test_parallel_config_error_is_a_value_error():
    assert issubclass(ParallelConfigError, ValueError)


def test_parallel_state_needs_initialised_distributed():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialised"):
        ParallelState(tp=1)


def _build_states():
    """Two layouts in one process (TP=2 x PP=2, then TP=2 x DP=2); groups checked with real collectives."""
    out = {}
    for name, (tp, pp) in {"tp2pp2": (2, 2), "tp2dp2": (2, 1)}.items():
        ps = ParallelState(tp=tp, pp=pp, virtual_pp=2 if pp > 1 else None)
        sums = {}
        for kind in ("tp", "dp", "pp", "mp", "embedding"):
            t = torch.tensor([float(ps.rank)])
            comm.all_reduce(t, getattr(ps, f"{kind}_group"))
            sums[kind] = int(t.item())
        out[name] = dict(rank=ps.rank, tp=(ps.tp_rank, ps.tp_size), dp=(ps.dp_rank, ps.dp_size),
                         pp=(ps.pp_rank, ps.pp_size), first=ps.is_first_stage, last=ps.is_last_stage,
                         next=ps.next_rank, prev=ps.prev_rank, src=ps.tp_src_rank, last_rank=ps.last_stage_rank,
                         virtual=ps.virtual_pp_size, sums=sums, world=ps.world_size, repr=repr(ps))
    # four stages: ranks 1 and 2 are middle stages, in no embedding group
    ps = ParallelState(tp=1, pp=4)
    out["pp4"] = dict(ranks=ps.embedding_ranks, has_group=ps.embedding_group is not None, pp=ps.pp_ranks,
                      first=ps.is_first_stage, last=ps.is_last_stage, next=ps.next_rank, prev=ps.prev_rank)
    return out


@pytest.fixture(scope="module")
def four_rank_results():
    return run_distributed(_build_states, 4, timeout_s=120)


def test_parallel_state_on_four_gloo_ranks(four_rank_results):
    results = four_rank_results
    # TP=2 x PP=2: TP groups [0,1] [2,3]; PP groups [0,2] [1,3]; DP groups singletons.
    for rank, res in enumerate(results):
        a = res["tp2pp2"]
        tp_rank, pp_rank = rank % 2, rank // 2
        assert (a["rank"], a["world"], a["virtual"]) == (rank, 4, 2)
        assert a["tp"] == (tp_rank, 2) and a["pp"] == (pp_rank, 2) and a["dp"] == (0, 1)
        assert a["first"] == (pp_rank == 0) and a["last"] == (pp_rank == 1)
        partner = tp_rank + 2 * (1 - pp_rank)
        assert a["next"] == partner and a["prev"] == partner  # two stages: both neighbours are the other one
        assert a["src"] == 2 * pp_rank and a["last_rank"] == 2 + tp_rank
        # sums of global ranks over each group prove the group membership
        assert a["sums"] == dict(tp=4 * pp_rank + 1, dp=rank, pp=rank + partner, mp=6, embedding=rank + partner)
        assert f"tp={tp_rank}/2" in a["repr"] and f"pp={pp_rank}/2" in a["repr"]

        b = res["tp2dp2"]
        dp_rank = rank // 2
        assert b["tp"] == (tp_rank, 2) and b["dp"] == (dp_rank, 2) and b["pp"] == (0, 1)
        assert b["first"] and b["last"] and b["next"] == rank and b["prev"] == rank and b["virtual"] == 1
        assert b["sums"] == dict(tp=4 * dp_rank + 1, dp=tp_rank + tp_rank + 2, pp=rank, mp=4 * dp_rank + 1,
                                 embedding=rank)


def test_parallel_state_with_middle_pipeline_stages(four_rank_results):
    """PP=4: the embedding group joins ranks 0 and 3; middle stages hold none; neighbours wrap around."""
    for rank, res in enumerate(four_rank_results):
        a = res["pp4"]
        middle = rank in (1, 2)
        assert a["ranks"] == ([] if middle else [0, 3]) and a["has_group"] == (not middle)
        assert a["pp"] == [0, 1, 2, 3] and a["first"] == (rank == 0) and a["last"] == (rank == 3)
        assert a["next"] == (rank + 1) % 4 and a["prev"] == (rank - 1) % 4
