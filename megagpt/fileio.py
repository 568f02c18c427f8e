"""Atomic file writes: the one way megagpt puts a user's checkpoint or cache file under its final name."""
from __future__ import annotations

import os
import socket
from typing import Any, Callable


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
    dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
