#!/usr/bin/env python3
"""Merge Megatron `.bin/.idx` datasets into one, without re-tokenizing (flags as Megatron-LM's tool):

    python tools/merge_datasets.py --input data/shards/ --output-prefix data/corpus_text_document

Every .bin/.idx pair in the --input directory is appended in name order; the token bytes are copied with
constant memory and the output appears atomically. All inputs must share one token dtype (checked first).
The work is megagpt.data.indexed_dataset.merge_datasets; this file only parses flags.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megagpt.data.indexed_dataset import IndexedDataset, dataset_prefixes, merge_datasets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="directory holding the .bin/.idx pairs to merge")
    p.add_argument("--output-prefix", required=True, help="output: <prefix>.bin / <prefix>.idx")
    p.add_argument("--multimodal", action="store_true",
                   help="Megatron's multimodal index (per-sequence modes); not supported by this format")
    args = p.parse_args(argv)
    if args.multimodal:
        print("error: --multimodal datasets (an index with a modes array) are not supported; megagpt reads and "
              "writes text datasets only", file=sys.stderr)
        return 2
    try:
        prefixes = dataset_prefixes(args.input)
        if os.path.abspath(args.output_prefix) in map(os.path.abspath, prefixes):
            raise ValueError(f"--output-prefix {args.output_prefix} is one of the inputs")
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
        merge_datasets(prefixes, args.output_prefix)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    merged = IndexedDataset(args.output_prefix, validate=False)
    print(f"merged {len(prefixes)} datasets: {len(merged)} documents, {int(merged.sequence_lengths.sum())} "
          f"tokens ({merged.dtype}) -> {args.output_prefix}.bin / .idx", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
