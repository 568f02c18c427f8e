"""Tensor-parallel collectives per rank per training step, counted, against the analytic minimum of Megatron's scheme.

What it measures: every collective call a rank makes and its algorithmic volume (the bytes a ring algorithm sends
per rank for that call: all-reduce 2(n-1)/n x bytes, all-gather (n-1) x input bytes, reduce-scatter (n-1) x output
bytes). It does not measure bytes on the wire: the backend may choose another algorithm (tree, NVLS) or compress.

    python bench/comm_volume.py [--layers 2] [--hidden 64] [--heads 4] [--seq 32] [--micro 2] [--microbatches 2]

For TP=2 and TP=4, with and without sequence parallel (DP=1, PP=1, so every collective is TP traffic), one
training step of a small GPT runs on gloo ranks through `megagpt.training.setup` / `Trainer`, split in two
measured phases:
  fwd+bwd    `engines.native.run_schedule` (forward and backward of every micro-batch)
  optimizer  `TrainingOptimizer.step()` (SP grad all-reduce, grad norm, AdamW)
Each phase is measured twice, independently:
  comm       `megagpt.parallel.comm.count_bytes()` (what the library's wrappers record)
  wire       wrappers around the torch.distributed calls themselves, installed in each rank, so a call that
             bypassed comm's accounting would still be seen; they also check that every collective ran on the TP group.
Both count the same kinds under the same names (`all_reduce_max` is the max all-reduce of the cross-entropy).

Analytic minimum per micro-batch, A = b s h x 4 bytes (fp32), T = b s x 4 bytes (one fp32 per token), n = TP:
  without SP   embedding g: 1 all-reduce of A (fwd); per layer 2 all-reduces fwd (row-linear g) + 2 bwd
               (column-linear f); LM-head f: 1 all-reduce of A (bwd); cross-entropy: all-reduce max of T and
               all-reduce sum of 2T (target logit, sum of exp)  ->  [(4L + 2) A + 3T] x 2(n-1)/n
  with SP      embedding: reduce-scatter of A (fwd, the g of the vocab-split lookup fused with the sequence
               split) + all-gather (bwd); per layer 4 all-gathers + 4 reduce-scatters (2 of each per direction);
               LM head: all-gather (fwd) + reduce-scatter (bwd); cross-entropy as above
               ->  (8L + 4) A x (n-1)/n + 3T x 2(n-1)/n
  optimizer    one fp32 scalar all-reduce (grad norm, clip_grad > 0); with SP also one all-reduce of the grads
               of the sequence-parallel params (per layer 2 LayerNorms x (weight + bias) + 2 row-linear biases,
               plus the final LayerNorm): (6 L h + 2 h + 1) x 4 bytes x 2(n-1)/n
The headline is measured (wire) / minimum per phase; 1.00 means no extra byte moved.
"""
from __future__ import annotations

import argparse
import functools
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from _common import REPO, print_table

sys.path.insert(0, str(REPO / "tests"))
from distributed import run_distributed  # noqa: E402

_WIRE: Counter = Counter()
_FOREIGN: Counter = Counter()   # collectives on a group other than the TP group (there should be none)


def _ranks(group) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))


def _install_wire_counters(tp_ranks: tuple[int, ...]) -> None:
    """Wrap torch.distributed's collectives in this process so every call is counted where it really happens."""

    def wrap(name: str, volume):
        original = getattr(dist, name)

        @functools.wraps(original)
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            n = dist.get_world_size(group)
            kind, nbytes = volume(n, *args, **kwargs)
            if n > 1:
                (_WIRE if _ranks(group) == tp_ranks else _FOREIGN)[kind] += nbytes
            return original(*args, **kwargs)

        setattr(dist, name, counted)

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def all_reduce(n, tensor, op=dist.ReduceOp.SUM, **_):
        kind = "all_reduce_max" if op == dist.ReduceOp.MAX else "all_reduce"
        return kind, 2 * (n - 1) / n * nbytes(tensor)

    wrap("all_reduce", all_reduce)
    for name in ("all_gather_single", "all_gather_into_tensor"):  # comm picks whichever this torch has
        if hasattr(dist, name):
            wrap(name, lambda n, out, inp, **_: ("all_gather", (n - 1) * nbytes(inp)))
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        if hasattr(dist, name):
            wrap(name, lambda n, out, inp, **_: ("reduce_scatter", (n - 1) * nbytes(out)))
    wrap("all_gather", lambda n, outs, inp, **_: ("all_gather", (n - 1) * nbytes(inp)))
    wrap("reduce_scatter", lambda n, out, inps, **_: ("reduce_scatter", (n - 1) * nbytes(out)))
    wrap("broadcast", lambda n, t, *a, **_: ("broadcast", nbytes(t)))
    wrap("isend", lambda n, t, *a, **_: ("p2p", nbytes(t)))
    wrap("send", lambda n, t, *a, **_: ("p2p", nbytes(t)))


def _config(tp: int, sp: bool, a: dict):
    from megagpt.training import config_for_test
    return config_for_test(
        num_layers=a["layers"], hidden_size=a["hidden"], num_attention_heads=a["heads"], seq_length=a["seq"],
        max_position_embeddings=a["seq"], vocab_size=500, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, sequence_parallel=sp,
        micro_batch_size=a["micro"], global_batch_size=a["micro"] * a["microbatches"], train_iters=2,
        eval_interval=0, eval_iters=0, log_interval=2, lr=1e-3, min_lr=1e-4, lr_warmup_iters=0, clip_grad=1.0,
        mock_data=True, tokenizer_type="ByteTokenizer", seed=1234)


def measure_rank(tp: int, sp: bool, a: dict) -> dict:
    """One rank: set up, then count bytes of (fwd+bwd) and (optimizer step) of one training step."""
    from megagpt.engines.native import run_schedule
    from megagpt.parallel import comm
    from megagpt.parallel.param_tags import is_sequence_parallel
    from megagpt.training import setup

    trainer, ps = setup(_config(tp, sp, a), log=False)
    _install_wire_counters(_ranks(ps.tp_group))
    for model in trainer.chunks:
        model.train()
    optimizer = trainer.engine.optimizer
    count = trainer.num_microbatches
    optimizer.zero_grad(count)
    batches = trainer.train_data.next_step(count)
    out = {}
    for phase, run in (("fwd+bwd", lambda: run_schedule(trainer.config, trainer.chunks, ps, batches, count, False)),
                       ("optimizer", lambda: optimizer.step(trainer.global_batch_size))):
        _WIRE.clear()
        with comm.count_bytes() as counted:
            run()
        out[phase] = {"comm": dict(counted), "wire": dict(_WIRE)}
    out["foreign"] = dict(_FOREIGN)
    out["sp_param_numel"] = sum(p.numel() for m in trainer.chunks for p in m.parameters()
                                if is_sequence_parallel(p))
    return out


def sp_param_numel(a: dict) -> int:
    """Params whose grads are partial per TP rank under SP: 2 LayerNorms per layer + row biases (6h per layer),
    the final LayerNorm (2h) and the position embeddings (each rank adds only its sequence slice)."""
    return a["layers"] * 6 * a["hidden"] + 2 * a["hidden"] + a["seq"] * a["hidden"]


def minimum(tp: int, sp: bool, a: dict) -> dict[str, dict[str, float]]:
    """The analytic minimum per phase and collective kind (bytes sent per rank), from the docstring's formulas."""
    n, L, m = tp, a["layers"], a["microbatches"]
    act = a["micro"] * a["seq"] * a["hidden"] * 4         # A: one [s, b, h] fp32 activation
    tok = a["micro"] * a["seq"] * 4                      # T: one fp32 per token
    ar, ring = 2 * (n - 1) / n, (n - 1) / n
    ce = {"all_reduce_max": m * tok * ar, "all_reduce": m * 2 * tok * ar}
    if sp:
        fwd = {"all_gather": m * (4 * L + 2) * act * ring, "reduce_scatter": m * (4 * L + 2) * act * ring, **ce}
        opt = {"all_reduce": (sp_param_numel(a) + 1) * 4 * ar}
    else:
        fwd = {"all_reduce": m * (4 * L + 2) * act * ar + ce["all_reduce"], "all_reduce_max": ce["all_reduce_max"]}
        opt = {"all_reduce": 1 * 4 * ar}
    return {"fwd+bwd": fwd, "optimizer": opt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--micro", type=int, default=2, help="micro-batch size b")
    parser.add_argument("--microbatches", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--tp", type=int, nargs="*", default=[2, 4])
    a = vars(parser.parse_args())
    print(f"GPT L={a['layers']} h={a['hidden']} heads={a['heads']} s={a['seq']} b={a['micro']} x "
          f"{a['microbatches']} micro-batches, vocab 500 (padded to 128 x TP), fp32, DP=1 PP=1\n")
    rows, headline, notes = [], [], []
    for tp in a["tp"]:
        for sp in (False, True):
            results = run_distributed(measure_rank, tp, tp, sp, a)
            layout = f"TP={tp}" + (" SP" if sp else "")
            if any(r != results[0] for r in results[1:]):
                notes.append(f"{layout}: ranks differ in bytes sent: {[r['fwd+bwd']['wire'] for r in results]}")
            r0, mins = results[0], minimum(tp, sp, a)
            if r0["foreign"]:
                notes.append(f"{layout}: collectives outside the TP group: {r0['foreign']}")
            for phase in ("fwd+bwd", "optimizer"):
                comm_c, wire, mn = r0[phase]["comm"], r0[phase]["wire"], mins[phase]
                for kind in sorted(set(comm_c) | set(wire) | set(mn)):
                    w, c, m = wire.get(kind, 0), comm_c.get(kind, 0), mn.get(kind, 0)
                    rows.append([layout, phase, kind, f"{m:,.0f}", f"{c:,.0f}", f"{w:,.0f}",
                                 f"{w / m:.2f}" if m else ("-" if not w else "extra")])
                tw, tc, tm = sum(wire.values()), sum(comm_c.values()), sum(mn.values())
                rows.append([layout, phase, "TOTAL", f"{tm:,.0f}", f"{tc:,.0f}", f"{tw:,.0f}", f"{tw / tm:.2f}"])
                headline.append([layout, phase, f"{tm:,.0f}", f"{tw:,.0f}", f"{tw / tm:.2f}",
                                 "" if tc == tw else f"comm.count_bytes misses {tw - tc:,.0f} B"])
            excess = sum(r0["fwd+bwd"]["wire"].values()) - sum(mins["fwd+bwd"].values())
            emb_ar = a["microbatches"] * a["micro"] * a["seq"] * a["hidden"] * 4 * (tp - 1) / tp
            if sp and excess > 0:
                notes.append(f"{layout}: fwd+bwd excess {excess:,.0f} B "
                             + ("= exactly one extra (n-1)/n x A per micro-batch: the embedding output is all-reduced "
                                "then split (g + scatter) instead of reduce-scattered" if excess == emb_ar else
                                f"(not the embedding all-reduce, which would be {emb_ar:,.0f} B)"))
            if sp and r0["sp_param_numel"] != sp_param_numel(a):
                notes.append(f"{layout}: {r0['sp_param_numel']} sequence-parallel param elements, formula assumes "
                             f"{sp_param_numel(a)}")
    print_table(["layout", "phase", "collective", "minimum B", "comm.count_bytes B", "wire B", "wire/min"], rows,
                title="Bytes sent per rank per training step, by collective (ring volumes)")
    print_table(["layout", "phase", "minimum B", "measured B", "measured/min", "note"], headline,
                title="Headline: measured (torch.distributed level) / analytic minimum")
    for note in notes:
        print("NOTE:", note)


if __name__ == "__main__":
    main()
