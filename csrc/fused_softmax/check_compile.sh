#!/usr/bin/env bash
# Compile the fused softmax kernels (csrc/fused_softmax/*.cuh) with nvcc for sm_80 and sm_90 through the
# standalone check_compile.cu: no PyTorch, no GPU, nothing runs. Prints ptxas' register/spill summary.
# Usage: bash csrc/fused_softmax/check_compile.sh   (NVCC=/path/to/nvcc to pick a compiler)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

nvcc_bin="${NVCC:-}"
if [[ -z "$nvcc_bin" ]]; then
  nvcc_bin="$(command -v nvcc || true)"
fi
if [[ -z "$nvcc_bin" ]]; then
  for candidate in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
    if [[ -x "$candidate" ]]; then nvcc_bin="$candidate"; break; fi
  done
fi
if [[ -z "$nvcc_bin" ]]; then
  echo "check_compile: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 1
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/fused_softmax_check.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

start=$SECONDS
# --threads 2: the two architectures are compiled in parallel.
if ! "$nvcc_bin" -std=c++17 -O3 --threads 2 \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -Werror all-warnings -Xptxas -v \
    -c "$here/check_compile.cu" -o "$tmp/check_compile.o" 2> "$tmp/nvcc.log"; then
  grep -v '^ptxas info' "$tmp/nvcc.log" | grep -v '^ *[0-9]* bytes stack frame' >&2 || true
  echo "check_compile: FAILED ($("$nvcc_bin" --version | tail -n 1))" >&2
  exit 1
fi

# One line per (arch, kernel family, dtype): registers and spill bytes by elements-per-lane class.
python3 - "$tmp/nvcc.log" <<'PY'
import re, sys
rows, current, spill = {}, None, 0
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
    if m:
        current = m.group(1), m.group(2)
        continue
    m = re.search(r"(\d+) bytes spill stores", line)
    if m:
        spill = int(m.group(1))
    m = re.search(r"Used (\d+) registers", line)
    if m and current:
        name, arch = current
        k = re.search(r"softmax_(forward|backward)_kernelINS_\d+(Fp16|Bf16)TraitsELi(\d+)E(Lb([01])E)?", name)
        kind = k.group(1) + ("" if k.group(5) is None else ("+mask" if k.group(5) == "1" else ""))
        rows.setdefault((arch, kind, k.group(2)), {})[int(k.group(3))] = (int(m.group(1)), spill)
        current, spill = None, 0
n = sum(len(v) for v in rows.values())
print(f"check_compile: {n} kernels compiled; regs/spill-bytes by key length (E = elements per lane)")
for (arch, kind, dtype), by_log2 in sorted(rows.items()):
    cells = " ".join(f"{32 << l}:{r}/{s}" for l, (r, s) in sorted(by_log2.items()))
    print(f"  {arch} {kind:<13} {dtype}  {cells}")
PY
echo "check_compile: OK in $((SECONDS - start)) s ($("$nvcc_bin" --version | tail -n 1))"
