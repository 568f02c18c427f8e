"""Single-rank training-step speed of megagpt's real path, as a fraction of this machine's fp32 matmul rate.

    python bench/step.py [--warmup 2] [--iters 5] [--threads 2] [--layers 6] [--hidden 384] [--heads 6]
                         [--seq 256] [--batch 8] [--vocab 50257]

Builds a GPT (default: L=6 h=384 heads=6 s=256 b=8, GPT-2 vocabulary 50257, fp32, dropout 0) through
`megagpt.training.setup` on a one-rank gloo group with mock data, and times `Trainer.train_step()` (data fetch,
forward, backward, grad finalisation, clipping, AdamW step): the path `pretrain` runs. Reports the median
ms/step, tokens/s and model FLOP/s from DESIGN.md's formula `72 B s L h^2 (1 + s/6h + V/12Lh)` (V = the padded
vocabulary the model really multiplies by, as Megatron counts it), and that rate as a fraction of the best fp32
torch.mm rate measured in the same process with the same thread count (before and after the steps; the better
of the two is the ceiling). When `transformers` is importable, Hugging Face's GPT2LMHeadModel of the same size
is timed the same way (forward, loss, backward, AdamW); otherwise the reference numbers measured earlier on this
machine are printed as cited, marked so.
"""
from __future__ import annotations

import argparse
import importlib.util

import torch

from _common import load_average, matmul_rate, median, print_table, single_rank_env, time_calls

# Measured earlier on this machine (same model size, 2 threads), cited, not re-measured by this script.
CITED = [("megatron-core GPTModel (cited)", 0.84, 747.0), ("HF GPT2LMHeadModel (cited)", 0.57, None)]


def megagpt_config(args: argparse.Namespace, steps: int):
    from megagpt.training import config_for_test
    return config_for_test(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads, seq_length=args.seq,
        max_position_embeddings=args.seq, vocab_size=args.vocab, hidden_dropout=0.0, attention_dropout=0.0,
        micro_batch_size=args.batch, global_batch_size=args.batch, train_iters=steps, eval_interval=0,
        eval_iters=0, log_interval=steps, lr=1e-4, min_lr=1e-5, lr_warmup_iters=0, weight_decay=0.1,
        clip_grad=1.0, mock_data=True, tokenizer_type="ByteTokenizer", seed=1234, num_threads=args.threads)


def time_megagpt(args: argparse.Namespace) -> tuple[tuple[list[float], list[float]], float, list[float]]:
    """(wall, CPU) seconds per train_step, model FLOPs per step, and the losses (a sanity check that it trains)."""
    import torch.distributed as dist
    from megagpt.train_log import model_flops_per_iteration
    from megagpt.training import setup

    single_rank_env()
    config = megagpt_config(args, args.warmup + args.iters)
    trainer, _ = setup(config, log=False)
    flops = model_flops_per_iteration(config, trainer.chunks[0].padded_vocab, trainer.global_batch_size)
    losses: list[float] = []

    def step() -> None:
        loss, ok, _ = trainer.train_step()
        losses.append(loss)
        if not ok:
            raise RuntimeError("optimizer skipped a step in fp32: something is wrong")

    times = time_calls(step, args.warmup, args.iters)
    dist.destroy_process_group()
    return times, flops, losses


def time_hf(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Seconds per step of Hugging Face GPT2LMHeadModel with the same shapes (eager attention, fp32, no dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.hidden, n_layer=args.layers,
                     n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return time_calls(step, args.warmup, args.iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=50257)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {load_average()} (before)")
    before = matmul_rate()
    times, flops, losses = time_megagpt(args)
    torch.set_num_threads(args.threads)  # setup() set it from the config too; keep the ceiling's count identical
    hf_times = time_hf(args) if importlib.util.find_spec("transformers") else None
    after = matmul_rate()
    peak, n_peak = max(before[0], after[0]), (before if before[0] >= after[0] else after)[2]
    peak_cpu = max(before[1], after[1])
    print(f"{load_average()} (after)")
    print(f"fp32 torch.mm ceiling, best of n in 1024/1536/2048: {peak / 1e9:.1f} GFLOP/s by wall clock (n={n_peak}; "
          f"before {before[0] / 1e9:.1f}, after {after[0] / 1e9:.1f}), {peak_cpu / 1e9:.1f} GFLOP/s by CPU time")
    print(f"model FLOPs per step (72 B s L h^2 (1 + s/6h + V/12Lh), padded V): {flops / 1e9:.1f} GFLOP; "
          f"losses {losses[0]:.3f} -> {losses[-1]:.3f}\n")

    tokens = args.batch * args.seq
    rows = []

    def add(name: str, wall_cpu: tuple[list[float], list[float]]) -> None:
        wall, cpu = wall_cpu
        sec = median(wall)
        cpu_sec = median(cpu) / args.threads    # the step's time had it the cores to itself
        rows.append([name, f"{sec * 1e3:.0f}", f"{min(wall) * 1e3:.0f}", f"{cpu_sec * 1e3:.0f}",
                     f"{tokens / sec:.0f}", f"{flops / sec / 1e9:.1f}", f"{flops / sec / peak:.0%}",
                     f"{flops / cpu_sec / peak_cpu:.0%}"])

    add("megagpt Trainer.train_step", times)
    if hf_times is not None:
        add("HF GPT2LMHeadModel (this run)", hf_times)
        print("(HF runs in this process after megagpt's set-up, so it shares megagpt's host-allocator setting, "
              "parallel.launch.keep_host_memory_mapped; the 57% cited for it was measured under glibc's defaults)")
    else:
        for name, frac, tok_s in CITED:
            rows.append([name, "-", "-", "-", f"{tok_s:.0f}" if tok_s else "-", "-", f"{frac:.0%}", "-"])
        print("(transformers is not installed: Hugging Face / megatron-core rows are cited, not re-measured)")
    print_table(["model", "ms/step median", "ms/step min", "CPU ms/thr", "tokens/s", "model GFLOP/s",
                 "of mm peak (wall)", "of mm peak (CPU)"], rows,
                title=f"GPT L={args.layers} h={args.hidden} heads={args.heads} s={args.seq} b={args.batch} "
                      f"V={args.vocab} fp32, {args.threads} threads, median of {args.iters} after {args.warmup} "
                      f"warm-up steps")
    print("wall: median step time vs best wall-clock mm rate; CPU: median (process CPU time / threads) vs the mm "
          "rate by the same clock - the steadier number when other processes share the cores.")

if __name__ == "__main__":
    main()
