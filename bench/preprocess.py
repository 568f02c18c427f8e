#!/usr/bin/env python3
"""Benchmark tools/preprocess_data.py on the demo corpus and on 20 copies of it, at 1 and 2 workers, with the
gigatoken backend and with HF tokenizers side by side.

Per configuration (median of --repeats runs): start-up (process launch -> the tool's "first document written" log
line, timed here from the outside), steady MB/s and tokens/s (the tool's own in-process timings: work after the
first document / time after it), end-to-end MB/s (input / wall time), and peak RSS of the whole process tree
(main + workers, summed, from /proc polled every 20 ms). Then a per-core comparison of tokenization strategies on
the same text.

References on this kind of machine (2 cores): Megatron-LM's preprocess_data.py 7 s start-up, 2.5 MB/s at 1 worker,
4.3 MB/s at 2; its preprocess_data_fast.py (gigatoken) 6 s start-up, 55 MB/s, all tokens held in memory.
Usage: python bench/preprocess.py [--corpus data/shakespeare.jsonl] [--copies 20] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

from _common import REPO, load_average, print_table

ROOT = str(REPO)
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")
MEGATRON = {"startup_s": 7.0, 1: 2.5, 2: 4.3}
MEGATRON_FAST = {"startup_s": 6.0, "mbs": 55.0}


def _tree_rss_kb(pid: int) -> int:
    """Summed VmRSS of pid and its descendants (0 once gone)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_tool(corpus: str, workers: int, out_dir: str, backend: str) -> dict:
    cmd = [sys.executable, TOOL, "--input", corpus, "--output-prefix", os.path.join(out_dir, f"w{workers}"),
           "--tokenizer-type", "GPT2BPETokenizer", "--append-eod", "--workers", str(workers),
           "--tokenizer-backend", backend, "--log-interval", "0", "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    first_seen, lines = None, []
    for line in proc.stderr:
        if first_seen is None and line.startswith("first document written"):
            first_seen = time.perf_counter() - t0
        lines.append(line)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    text = "".join(lines)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n{text}")
    m = re.search(r"Done: (\d+) documents, (\d+) tokens, ([\d.]+) MB in ([\d.]+) s", text)
    first_in = float(re.search(r"first document written after ([\d.]+) s", text).group(1))
    docs, tokens, mb, secs = int(m.group(1)), int(m.group(2)), float(m.group(3)), float(m.group(4))
    steady_s = max(secs - first_in, 1e-9)
    # Work done before the first write is about one 1 MiB chunk per worker and its tokens.
    first_mb = min(1.048576 * workers, mb)
    return {"docs": docs, "tokens": tokens, "mb": mb, "startup": first_seen, "wall": wall,
            "mbs": (mb - first_mb) / steady_s, "toks": tokens * (1 - first_mb / mb) / steady_s,
            "e2e": mb / wall, "rss_mb": peak[0] / 1024, "backend": re.search(r"tokenizer backend: (\S+)", text)[1]}


def tokenizer_strategies(corpus: str, limit_mb: float = 3.0) -> list[tuple[str, float]]:
    """Single-process MB/s of ways to get GPT-2 ids for the same documents (second pass: warm caches)."""
    from megagpt.data.fast_tokenizer import choose_backend
    from megagpt.data.tokenizer import GPT2BPETokenizer

    texts, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1].encode())
            if size > limit_mb * 1e6:
                break
    tok = GPT2BPETokenizer()
    hf = tok._hf
    fast, _ = choose_backend(tok, "auto")
    ways = [
        ("HF encode() per document", lambda: [hf.encode(t).ids for t in texts]),
        (f"HF encode_batch_fast (Rust threads, {os.cpu_count()} cores)",
         lambda: [e.ids for e in hf.encode_batch_fast(texts)]),
        ("GPT2BPETokenizer: regex split + word cache (hf backend)", lambda: [tok.tokenize(t) for t in texts]),
    ]
    if fast is not tok:
        ways += [("gigatoken encode() per document (gigatoken backend)", lambda: fast.tokenize_flat(texts)),
                 ("gigatoken encode_batch, 1 thread", lambda: fast._gt.encode_batch(texts, parallel=False))]
    rows = []
    for name, fn in ways:
        fn()
        t = time.perf_counter()
        fn()
        rows.append((name, size / 1e6 / (time.perf_counter() - t)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default=os.path.join(ROOT, "data", "shakespeare.jsonl"))
    p.add_argument("--copies", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; the median (by MB/s) is shown")
    p.add_argument("--backends", nargs="+", default=["gigatoken", "hf"])
    args = p.parse_args()
    if not os.path.exists(args.corpus):
        sys.exit(f"{args.corpus} missing: run `bash examples/get_demo_corpus.sh` first")
    with tempfile.TemporaryDirectory() as tmp:
        big = os.path.join(tmp, f"x{args.copies}.jsonl")
        with open(args.corpus, "rb") as src, open(big, "wb") as dst:
            data = src.read()
            for _ in range(args.copies):
                dst.write(data)
        print(f"cores: {os.cpu_count()}   {load_average()}   corpus: {args.corpus}   tokenizer: GPT2BPETokenizer, "
              f"--append-eod   median of {args.repeats} runs\n")
        rows = []
        for backend in args.backends:
            for label, corpus in (("1x", args.corpus), (f"{args.copies}x", big)):
                for workers in (1, 2):
                    out = os.path.join(tmp, f"out-{workers}")
                    os.makedirs(out, exist_ok=True)
                    runs = sorted((run_tool(corpus, workers, out, backend) for _ in range(args.repeats)),
                                  key=lambda r: r["mbs"])
                    r = runs[len(runs) // 2]
                    rows.append((r["backend"], label, workers, r["docs"], f"{r['mb']:.1f}", f"{r['startup']:.2f}",
                                 f"{r['mbs']:.1f}", f"{r['e2e']:.1f}", f"{r['mbs'] / MEGATRON[workers]:.0f}x",
                                 f"{r['toks'] / 1e6:.2f}", f"{r['wall']:.2f}", f"{r['rss_mb']:.0f}"))
                    for f in os.listdir(out):
                        os.remove(os.path.join(out, f))
        print_table(("backend", "input", "workers", "docs", "MB", "start-up s", "steady MB/s", "end-to-end MB/s",
                     "x Megatron", "M tokens/s", "wall s", "peak RSS MB"), rows)
        print(f"Megatron-LM references: preprocess_data.py start-up {MEGATRON['startup_s']} s, {MEGATRON[1]} MB/s at "
              f"1 worker, {MEGATRON[2]} MB/s at 2, constant memory; preprocess_data_fast.py start-up "
              f"{MEGATRON_FAST['startup_s']} s, {MEGATRON_FAST['mbs']} MB/s, memory grows with the corpus.")
    print("\nTokenization strategies, one process, same documents:")
    for name, mbs in tokenizer_strategies(args.corpus):
        print(f"  {name:<58} {mbs:7.2f} MB/s")


if __name__ == "__main__":
    main()
