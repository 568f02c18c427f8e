#!/usr/bin/env python3
"""Train a GPT-2-style byte-level BPE tokenizer on JSON lines.

    python tools/train_tokenizer.py --input data/shakespeare.jsonl --vocab-size 8192 --output-dir data/tok8k

The output directory gets vocab.json + merges.txt (use them with `--tokenizer-type GPT2BPETokenizer
--vocab-file DIR/vocab.json --merge-file DIR/merges.txt`) and tokenizer.json (`--tokenizer-type
HuggingFaceTokenizer --tokenizer-model DIR/tokenizer.json`). Bad lines are skipped, counted and reported as in
tools/preprocess_data.py. The library code is megagpt.data.tokenizer.train_bpe_tokenizer.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megagpt.data.preprocess import (MAX_REPORTED_BAD_LINES, BadLine, iter_chunks, parse_json_line,  # noqa: E402
                                     resolve_inputs)
from megagpt.data.tokenizer import train_bpe_tokenizer  # noqa: E402


class JsonlTexts:
    """Iterates the texts of `keys` in every line of `paths`, remembering the lines it had to skip."""

    def __init__(self, paths: Sequence[str], keys: Sequence[str]) -> None:
        self.paths, self.keys = paths, keys
        self.documents, self.skipped, self.first_bad = 0, 0, []

    def __iter__(self) -> Iterator[str]:
        for chunk in iter_chunks(self.paths):
            for offset, raw in enumerate(chunk.lines):
                if not raw.strip():
                    continue
                values, reason = parse_json_line(raw, self.keys)
                if reason:
                    self.skipped += 1
                    if len(self.first_bad) < MAX_REPORTED_BAD_LINES:
                        self.first_bad.append(BadLine(self.paths[chunk.path_index], chunk.first_line + offset, reason))
                    continue
                self.documents += 1
                yield from values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="JSONL file or glob of files")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose text is trained on (default: text)")
    p.add_argument("--vocab-size", type=int, required=True, help="ids in the trained vocabulary, eod included")
    p.add_argument("--min-frequency", type=int, default=2, help="merge pairs seen fewer times are not learnt")
    p.add_argument("--output-dir", required=True, help="new directory for vocab.json, merges.txt, tokenizer.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        paths = resolve_inputs(args.input)
        texts = JsonlTexts(paths, args.json_keys)
        tokenizer = train_bpe_tokenizer(texts, args.vocab_size, args.output_dir, args.min_frequency,
                                        show_progress=not args.no_progress)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"trained on {texts.documents} documents from {len(paths)} file(s): vocab size {tokenizer.vocab_size}, "
          f"eod id {tokenizer.eod}; wrote {args.output_dir}/{{vocab.json,merges.txt,tokenizer.json}}")
    if texts.skipped:
        print(f"skipped {texts.skipped} bad line(s); first {len(texts.first_bad)}:")
        for bad in texts.first_bad:
            print(f"  {bad}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
