"""Files only their owner may read: the state dirs of coordinators and agents, keys, tokens' env files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["private_dir", "write_file"]


def private_dir(path: Path) -> None:
    """Create ``path`` readable by its owner only; an existing directory is left as it is."""
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)  # mkdir's mode is filtered by the umask


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` atomically, with ``mode`` from the start: a reader sees the old file
    or the new, never half, and never the data under a wider mode."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)
