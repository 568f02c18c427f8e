"""Atomic file writes: the one way megagpt puts a user's checkpoint or cache file under its final name."""
from __future__ import annotations

import os
import shutil
import socket
import zlib
from typing import Any, Callable, Optional


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through `write(file)` to a temporary name beside `path`, fsync, then rename over `path`.

    A crash at any point leaves either the old file or the new one, never a torn file under the final name.
    The temporary name carries host and pid, so ranks on several nodes sharing a file system never collide.
    """
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_directory(folder)   # make the rename itself durable


def atomic_write_text(text: str, path: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


class _Checksummed:
    """A write-only file wrapper that keeps the length and CRC-32 of every byte passed through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.size, self.crc = f, 0, 0
        self.name = getattr(f, "name", "")     # the temporary file's path, as a file object has it

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.size, self.crc = self.size + view.nbytes, zlib.crc32(view, self.crc)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: Any, path: str) -> tuple[int, int]:
    """torch.save through atomic_write; returns (bytes, CRC-32) of the file, computed on its way to disk, so a
    checkpoint's digests cost no second read of what was just written."""
    import torch  # here, not at the top: data tools write through this module without needing torch loaded
    sums: list[_Checksummed] = []

    def write(f: Any) -> None:
        sums.append(_Checksummed(f))
        torch.save(obj, sums[0])

    atomic_write(path, write)
    return sums[0].size, sums[0].crc


def new_directory_problem(path: str) -> Optional[str]:
    """Why `path` cannot receive a new output directory (None: it does not exist, or is an empty directory)."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        return f"destination {path!r} exists and is not an empty directory; refusing to overwrite"
    return None


def write_directory_atomically(path: str, write: Callable[[str], None]) -> None:
    """Run `write(tmp_dir)` in a fresh temporary directory beside `path`, then rename it to `path`: all of it
    appears, or nothing. `path` must not exist or be empty; on any failure the temporary directory is removed."""
    problem = new_directory_problem(path)
    if problem:
        raise FileExistsError(problem)
    dst = os.path.abspath(path)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        if os.path.isdir(dst):
            os.rmdir(dst)          # empty (checked above); a rename cannot replace it while it exists
        os.replace(tmp, dst)
        fsync_directory(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_directory(folder: str) -> None:
    """Make renames inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """Flush every file under `folder` and the folders themselves (for files written by others' plain saves)."""
    for root, _, files in os.walk(folder):
        for path in [os.path.join(root, f) for f in files] + [root]:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
