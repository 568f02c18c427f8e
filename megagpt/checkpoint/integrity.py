"""Checkpoint integrity: a size and CRC-32 per file, recorded in metadata.json and verified before any shard is read.

Why: a file truncated by a full disk or a node lost mid-copy used to surface as torch's zip error on one rank while
the others died with "Connection closed by peer". With the digests recorded at save time, every rank checks the
files it is about to read, the ranks agree, and the one message names the damaged file, its iteration and the
earlier complete iterations to fall back to (`--ckpt-step N`). `tools/convert_checkpoint.py verify` runs the same
check offline over a whole checkpoint.

CRC-32 (zlib, about 4 GB/s on one core here) detects truncation and corruption; it is not a cryptographic hash.
metadata.json's `files` maps each path relative to the iteration folder to {"bytes": size, "crc32": "8 hex"}.
Checkpoints written before checksums existed have no `files` entry: they load unverified.
"""
from __future__ import annotations

import os
import zlib
from typing import Iterable, Optional

from megagpt.checkpoint.format import METADATA_FILE, complete_iterations, iteration_dir, read_metadata

_CHUNK = 16 * 2**20


def digest_record(size: int, crc: int) -> dict:
    """The `files` entry of one file in metadata.json."""
    return {"bytes": size, "crc32": f"{crc:08x}"}


def file_digest(path: str) -> dict:
    """digest_record of one file on disk, read in 16 MiB chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return digest_record(size, crc)


def digests_under(folder: str) -> dict[str, dict]:
    """Digests of every file below an iteration folder except metadata.json, keyed by the path relative to it (a
    single-process writer's record, read back from disk)."""
    paths = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
             if not (root == folder and name == METADATA_FILE)]
    return {os.path.relpath(p, folder): file_digest(p) for p in sorted(paths)}


def file_problem(path: str, expected: dict) -> Optional[str]:
    """Why `path` does not match its recorded digest (None: it does)."""
    if not os.path.isfile(path):
        return f"{path} is missing"
    size = os.path.getsize(path)
    if size != expected["bytes"]:
        return f"{path} has {size} bytes, {expected['bytes']} were written (truncated or overwritten)"
    crc = file_digest(path)["crc32"]
    if crc != expected["crc32"]:
        return f"{path} has CRC-32 {crc}, {expected['crc32']} was written (corrupted)"
    return None


def verify_files(directory: str, meta: dict, relpaths: Optional[Iterable[str]] = None) -> list[str]:
    """Problems of the recorded files of one iteration (`relpaths`: only these; default all of them)."""
    recorded = meta.get("files")
    if recorded is None:
        return []                                   # written before checksums: nothing to compare with
    folder = iteration_dir(directory, meta["iteration"])
    wanted = recorded if relpaths is None else relpaths
    problems = []
    for rel in wanted:
        if rel not in recorded:
            problems.append(f"{os.path.join(folder, rel)} is not listed in {METADATA_FILE}")
            continue
        problem = file_problem(os.path.join(folder, rel), recorded[rel])
        if problem:
            problems.append(problem)
    return problems


def damage_message(directory: str, iteration: int, problems: list[str]) -> str:
    """The one message every rank raises: the damaged files, and where to resume instead."""
    others = [i for i in complete_iterations(directory) if i != iteration]
    fallback = (f"complete earlier iterations: {', '.join(map(str, others))} (load one with --ckpt-step N, or check "
                f"them with tools/convert_checkpoint.py verify --load {directory} --ckpt-step N)" if others else
                "no other complete iteration is in that directory")
    shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
    return f"checkpoint of iteration {iteration} in {directory!r} is damaged: {shown}. {fallback}"


def verify_checkpoint(directory: str, iteration: Optional[int] = None) -> tuple[dict, list[str]]:
    """(metadata, problems) of one whole iteration (default: the tracker's), for the offline verify command."""
    meta = read_metadata(directory, iteration)
    return meta, verify_files(directory, meta)

