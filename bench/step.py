"""Single-rank training-step speed of megagpt's real path, against the matmul rate measured in the same run.

    python bench/step.py [--device cpu|cuda] [--precision fp32|bf16] [--attention-backend flash,fused,unfused]
                         [--model-size gpt2-124m | --layers 6 --hidden 384 --heads 6] [--seq 256] [--batch 8]
                         [--vocab 50257] [--warmup 2] [--iters 5] [--threads 2] [--fit]

Builds a GPT (default: L=6 h=384 heads=6 s=256 b=8, GPT-2 vocabulary 50257, dropout 0) through
`megagpt.training.setup` on a one-rank group with mock data, once per attention backend, and times
`Trainer.train_step()` (data fetch, forward, backward, grad finalisation, clipping, AdamW step): the path `pretrain`
runs. Reports the median ms/step, tokens/s and model FLOP/s from DESIGN.md's formula
`72 B s L h^2 (1 + s/6h + V/12Lh)` (V = the padded vocabulary the model really multiplies by, as Megatron counts
it), as a fraction of the best torch.mm rate of the run's precision measured in the same process (CPU: fp32 with the
same thread count, before and after the steps; CUDA: bf16/fp32 8192^2 with CUDA events), and on CUDA also against
the datasheet peak of the GPU (--peak-tflops, else the planner's preset for the GPU's name) with
`torch.cuda.max_memory_allocated` next to the planner's predicted peak. `--fit` halves the micro-batch until a step
fits in GPU memory. On the CPU, when `transformers` is importable, Hugging Face's GPT2LMHeadModel of the same size
(its default SDPA attention) is timed the same way (forward, loss, backward, AdamW) for the ratio.
"""
from __future__ import annotations

import argparse
import importlib.util
from typing import Optional

import torch

from _common import (device_matmul_rate, load_average, matmul_rate, median, print_table, single_rank_env,
                     time_calls)


def megagpt_config(args: argparse.Namespace, steps: int, backend: str, batch: int):
    from megagpt.training import config_for_test
    return config_for_test(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads, seq_length=args.seq,
        max_position_embeddings=args.seq, vocab_size=args.vocab, hidden_dropout=0.0, attention_dropout=0.0,
        micro_batch_size=batch, global_batch_size=batch, train_iters=steps, eval_interval=0,
        eval_iters=0, log_interval=steps, lr=1e-4, min_lr=1e-5, lr_warmup_iters=0, weight_decay=0.1,
        clip_grad=1.0, mock_data=True, tokenizer_type="ByteTokenizer", seed=1234, num_threads=args.threads,
        attention_backend=backend, bf16=args.precision == "bf16",
        distributed_backend="nccl" if args.device == "cuda" else "gloo")


def time_megagpt(args: argparse.Namespace, backend: str, batch: int) -> dict:
    """Seconds (wall, CPU) per train_step, model FLOPs per step, losses (a sanity check that it trains), and on
    CUDA the peak memory allocated and the planner's predicted peak."""
    import torch.distributed as dist
    from megagpt.plan.memory import all_stages
    from megagpt.train_log import model_flops_per_iteration
    from megagpt.training import setup

    single_rank_env()
    config = megagpt_config(args, args.warmup + args.iters, backend, batch)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer, _ = setup(config, log=False)
    flops = model_flops_per_iteration(config, trainer.chunks[0].padded_vocab, trainer.global_batch_size)
    losses: list[float] = []

    def step() -> None:
        loss, ok, _ = trainer.train_step()
        losses.append(loss)
        if not ok and args.precision == "fp32":
            raise RuntimeError("optimizer skipped a step in fp32: something is wrong")
        if cuda:
            torch.cuda.synchronize()

    try:
        times = time_calls(step, args.warmup, args.iters)
        memory = torch.cuda.max_memory_allocated() if cuda else None
    finally:
        del trainer
        dist.destroy_process_group()
    predicted = max(m.total for m in all_stages(config, 1)) if cuda else None
    return dict(times=times, flops=flops, losses=losses, memory=memory, predicted=predicted, batch=batch)


def time_megagpt_fitting(args: argparse.Namespace, backend: str) -> dict:
    """time_megagpt at --batch, halved on a CUDA out-of-memory error while --fit allows (down to 1)."""
    batch = args.batch
    while True:
        try:
            return time_megagpt(args, backend, batch)
        except torch.cuda.OutOfMemoryError:
            if not args.fit or batch == 1:
                raise
            batch //= 2
            torch.cuda.empty_cache()
            print(f"  {backend}: out of memory, retrying with micro-batch {batch}", flush=True)


def time_hf(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Seconds per step of Hugging Face GPT2LMHeadModel with the same shapes (its default attention, fp32, no
    dropout), on the CPU."""
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


def datasheet_peak(args: argparse.Namespace) -> Optional[float]:
    """FLOP/s of the GPU's datasheet for the run's precision: --peak-tflops, else the planner preset whose name
    matches the device name (the presets cite their sources), else None."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    from megagpt.plan.cluster import PRESETS
    name = torch.cuda.get_device_name().lower()
    for key, cluster in PRESETS.items():
        if key.split("-")[0] in name and (key.split("-")[-1] in name or "gb" not in key):
            return cluster.gpu_peak_tflops * 1e12
    return None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--attention-backend", default="flash", help="comma-separated: flash,fused,unfused,local")
    parser.add_argument("--model-size", default=None, help="a preset (gpt2-124m, gpt2-355m, gpt-1.3b, ...)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--fit", action="store_true", help="halve the micro-batch on CUDA out-of-memory")
    parser.add_argument("--peak-tflops", type=float, default=None, help="datasheet peak of the GPU")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face comparison")
    args = parser.parse_args()
    if args.model_size:
        from megagpt.cli import PRESETS
        preset = PRESETS[args.model_size]
        args.layers, args.hidden, args.heads = (preset["num_layers"], preset["hidden_size"],
                                                preset["num_attention_heads"])
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    print(f"torch {torch.__version__}, {args.device}" + (f" ({torch.cuda.get_device_name()})" if cuda else
          f", {torch.get_num_threads()} threads") + f", {args.precision}; {load_average()} (before)")
    before = device_matmul_rate(dtype) if cuda else matmul_rate()
    runs = {b: time_megagpt_fitting(args, b) for b in args.attention_backend.split(",")}
    torch.set_num_threads(args.threads)  # setup() set it from the config too; keep the ceiling's count identical
    hf_times = (time_hf(args) if not cuda and not args.no_hf and importlib.util.find_spec("transformers")
                else None)
    after = device_matmul_rate(dtype) if cuda else matmul_rate()
    peak = max(before[0], after[0])
    peak_cpu = max(before[1], after[1])
    sheet = datasheet_peak(args) if cuda else None
    print(f"{load_average()} (after)")
    print(f"{args.precision} torch.mm ceiling measured in this run: {peak / 1e12:.2f} TFLOP/s (before "
          f"{before[0] / 1e12:.2f}, after {after[0] / 1e12:.2f})" +
          (f"; datasheet peak {sheet / 1e12:.0f} TFLOP/s" if sheet else ""))
    first = next(iter(runs.values()))
    print(f"model FLOPs per step (72 B s L h^2 (1 + s/6h + V/12Lh), padded V): {first['flops'] / 1e9:.1f} GFLOP "
          f"at micro-batch {first['batch']}\n")

    rows = []

    def add(name: str, wall_cpu: tuple[list[float], list[float]], flops: float, batch: int,
            run: Optional[dict] = None) -> None:
        wall, cpu = wall_cpu
        sec = median(wall)
        row = [name, str(batch), f"{sec * 1e3:.1f}", f"{batch * args.seq / sec:.0f}",
               f"{flops / sec / 1e12:.3f}", f"{flops / sec / peak:.0%}"]
        if cuda:
            row += [f"{flops / sec / sheet:.0%}" if sheet else "-",
                    f"{run['memory'] / 2**30:.1f}" if run else "-", f"{run['predicted'] / 2**30:.1f}" if run else "-"]
        else:
            cpu_sec = median(cpu) / args.threads    # the step's time had it the cores to itself
            row += [f"{flops / cpu_sec / peak_cpu:.0%}"]
        rows.append(row)

    for backend, run in runs.items():
        add(f"megagpt {backend}", run["times"], run["flops"], run["batch"], run)
    if hf_times is not None:
        add("HF GPT2LMHeadModel (SDPA)", hf_times, first["flops"], args.batch)
        hf = median(hf_times[0])
        for backend, run in runs.items():
            print(f"megagpt {backend} vs Hugging Face: {hf / median(run['times'][0]):.2f}x faster (wall, same run)")
    headers = ["model", "micro-batch", "ms/step", "tokens/s", "model TFLOP/s", "of mm rate"]
    headers += ["of datasheet", "peak GiB", "plan GiB"] if cuda else ["of mm rate (CPU time)"]
    print_table(headers, rows, title=f"GPT L={args.layers} h={args.hidden} heads={args.heads} s={args.seq} "
                                     f"V={args.vocab} {args.precision} on {args.device}, median of {args.iters} "
                                     f"after {args.warmup} warm-up steps")


if __name__ == "__main__":
    main()
