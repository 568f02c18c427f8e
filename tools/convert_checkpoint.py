#!/usr/bin/env python3
"""Convert megagpt checkpoints: between parallel layouts, and to / from Hugging Face GPT-2 and Llama.

    python tools/convert_checkpoint.py reshard --load ckpt --save ckpt_tp1 \\
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1
    python tools/convert_checkpoint.py to-hf --load ckpt --save hf_gpt2
    python tools/convert_checkpoint.py from-hf --load hf_gpt2 --save ckpt_tp2 \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 1
    python tools/convert_checkpoint.py from-hf --load Llama-3.2-1B --save ckpt_llama_tp2 \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 1
    python tools/convert_checkpoint.py verify --load ckpt [--ckpt-step N | --all]

The Hugging Face architecture is read from config.json (`model_type` gpt2 or llama) on import, and from the
checkpoint's model flags on export (RoPE + RMSNorm + SwiGLU: a LlamaForCausalLM; else GPT2LMHeadModel), or given
with --model-type.

Single process on CPU, no process group. Outputs appear atomically (temporary directory, then a rename) and
only into a directory that does not exist or is empty. The work is done by megagpt.checkpoint.convert, hf_gpt2
and hf_llama.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megagpt.checkpoint.convert import ConversionError, reshard  # noqa: E402
from megagpt.checkpoint.format import CheckpointError, complete_iterations, read_metadata  # noqa: E402
from megagpt.checkpoint.integrity import verify_checkpoint  # noqa: E402


def _layout_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-tensor-parallel-size", type=int, required=True, help="TP of the written checkpoint")
    p.add_argument("--target-pipeline-parallel-size", type=int, required=True, help="PP of the written checkpoint")
    p.add_argument("--target-num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="layers per virtual stage (interleaved schedule) of the written checkpoint")


HF_TYPES = ("gpt2", "llama")


def _hf_module(args: argparse.Namespace):
    """hf_gpt2 or hf_llama (imports transformers lazily): --model-type, else config.json's model_type (from-hf) or
    the checkpoint's model flags (to-hf)."""
    from megagpt.checkpoint import hf_gpt2, hf_llama

    kind = args.model_type
    if kind is None and args.command == "from-hf":
        path = os.path.join(args.load, "config.json")
        kind = json.load(open(path)).get("model_type") if os.path.isfile(path) else "gpt2"
    elif kind is None:
        model = read_metadata(args.load, args.iteration)["config"]["model"]
        kind = "gpt2" if hf_llama.export_problems(model) else "llama"
    if kind not in HF_TYPES:
        raise ConversionError(f"{args.load}: model_type {kind!r} is not converted (only {', '.join(HF_TYPES)})")
    return hf_llama if kind == "llama" else hf_gpt2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reshard", help="write a megagpt checkpoint at another TP x PP (weights + optimizer state)")
    p.add_argument("--load", required=True, help="megagpt checkpoint directory")
    p.add_argument("--save", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--iteration", type=int, default=None, help="iteration to convert (default: the latest)")
    _layout_flags(p)
    p = sub.add_parser("to-hf", help="export a megagpt checkpoint as a Hugging Face GPT2LMHeadModel or "
                                     "LlamaForCausalLM directory")
    p.add_argument("--load", required=True, help="megagpt checkpoint directory (any layout)")
    p.add_argument("--model-type", choices=HF_TYPES, default=None, help="default: from the checkpoint's model flags")
    p.add_argument("--save", required=True, help="output directory for save_pretrained (must not exist or be empty)")
    p.add_argument("--iteration", type=int, default=None, help="iteration to export (default: the latest)")
    p = sub.add_parser("from-hf", help="import a Hugging Face GPT-2 or Llama directory as a megagpt checkpoint "
                                       "(weights only)")
    p.add_argument("--load", required=True, help="Hugging Face model directory (config.json + weights)")
    p.add_argument("--model-type", choices=HF_TYPES, default=None, help="default: config.json's model_type")
    p.add_argument("--rotary-interleaved", action="store_true",
                   help="llama: store q/k for megagpt's --rotary-interleaved (the same model, rows permuted per head)")
    p.add_argument("--save", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="vocabulary padding unit (x TP)")
    _layout_flags(p)
    p = sub.add_parser("verify", help="check every file of a native checkpoint against the sizes and CRC-32 "
                                      "recorded in its metadata.json (exit 1 when any is damaged)")
    p.add_argument("--load", required=True, help="megagpt checkpoint directory")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--ckpt-step", type=int, default=None, help="iteration to check (default: the latest)")
    which.add_argument("--all", action="store_true", help="check every complete iteration in the directory")
    return parser


def verify(args: argparse.Namespace) -> int:
    """Print one line per iteration checked (and each damaged file); 1 when any file is damaged, else 0."""
    iterations = complete_iterations(args.load) if args.all else [args.ckpt_step]
    if not iterations:
        raise CheckpointError(f"{args.load}: no complete checkpoint to verify")
    damaged = False
    for iteration in iterations:
        meta, problems = verify_checkpoint(args.load, iteration)
        files = meta.get("files")
        if files is None:
            print(f"iteration {meta['iteration']}: NOT VERIFIED, its metadata.json records no checksums (saved "
                  f"before megagpt recorded them)")
        elif problems:
            damaged = True
            print(f"iteration {meta['iteration']}: DAMAGED, {len(problems)} of {len(files)} files")
            for problem in problems:
                print(f"  {problem}")
        else:
            size = sum(d["bytes"] for d in files.values())
            print(f"iteration {meta['iteration']}: intact, {len(files)} files, {size / 2**20:.1f} MiB")
    return 1 if damaged else 0


def _num_chunks(args: argparse.Namespace, num_layers: int) -> int:
    per_stage = args.target_num_layers_per_virtual_pipeline_stage
    if per_stage is None:
        return 1
    pp = args.target_pipeline_parallel_size
    if per_stage < 1 or num_layers % (pp * per_stage):
        raise ConversionError(f"num-layers {num_layers} is not divisible by target pipeline-parallel size {pp} x "
                              f"num-layers-per-virtual-pipeline-stage {per_stage}")
    return num_layers // (pp * per_stage)


def run(args: argparse.Namespace) -> str:
    progress = not args.no_progress
    if args.command == "reshard":
        layers = read_metadata(args.load, args.iteration)["config"]["model"]["num_layers"]
        return reshard(args.load, args.save, args.target_tensor_parallel_size, args.target_pipeline_parallel_size,
                       iteration=args.iteration, num_chunks=_num_chunks(args, layers), progress=progress)
    hf = _hf_module(args)
    if args.command == "to-hf":
        state, config = hf.export_hf(args.load, args.iteration)
        hf.save_hf(state, config, args.save)
        return args.save
    config = hf.read_hf_config(args.load)
    extra = {"rotary_interleaved": True} if args.rotary_interleaved else {}
    if extra and hf.__name__.endswith("hf_gpt2"):
        raise ConversionError("--rotary-interleaved applies to Llama imports only")
    return hf.import_hf(args.load, args.save, args.target_tensor_parallel_size, args.target_pipeline_parallel_size,
                        num_chunks=_num_chunks(args, config.num_hidden_layers),
                        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, progress=progress, **extra)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "verify":
            return verify(args)
        out = run(args)
    except CheckpointError as exc:   # ConversionError included: bad input, reported before any heavy work
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
