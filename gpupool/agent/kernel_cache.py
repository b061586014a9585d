"""Compiled user kernels, cached in memory and on disk, and the pure rules that key and vet them.

A kernel source (:class:`~gpupool._proto.v1.agent_pb2.Kernel`) is compiled once per agent process and
kept in memory by :func:`cache_key`: the sha256 of its canonical source, options and argument types,
with the device's compute capability. CuPy keeps the compiled binaries on disk in ``CUPY_CACHE_DIR``,
which :class:`KernelCache` points at the agent's cache directory (:func:`cache_directory`), so a second
agent process on the same host, or the same agent after a restart, loads the binary instead of running
the compiler; a marker file per key there tells it so, and it counts the use as a hit.

The pure parts (:func:`canonical_source`, :func:`cache_key`, :func:`check_options`,
:func:`cache_directory`) need no CuPy and are tested without a GPU. Nothing here imports CuPy: the
caller (:mod:`gpupool.agent.kernels`) hands :meth:`KernelCache.get` the function that builds a kernel.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = [
    "CACHE_ENV",
    "CacheCounts",
    "KernelCache",
    "cache_directory",
    "cache_key",
    "canonical_source",
    "check_options",
    "counts",
    "shared_cache",
]

#: The environment variable that overrides the cache directory.
CACHE_ENV: Final = "GPUPOOL_KERNEL_CACHE"

#: How many compiler options a kernel may carry, and how long each may be.
MAX_OPTIONS: Final = 32
MAX_OPTION_LENGTH: Final = 256

#: Options taken as they are: language standard, fast math, fused multiply-add, line info.
_PLAIN_OPTIONS: Final = frozenset(
    {
        "--use_fast_math",
        "-use_fast_math",
        "--fmad=true",
        "--fmad=false",
        "-lineinfo",
        "--generate-line-info",
        *(f"{flag}=c++{year}" for flag in ("-std", "--std") for year in (11, 14, 17, 20)),
    }
)
_IDENTIFIER: Final = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
_MACRO_VALUE: Final = r"[A-Za-z0-9_.+\-]{0,64}"
#: ``-DNAME``, ``-DNAME=VALUE``, ``--define-macro=NAME=VALUE``: plain names and plain values only (no
#: quotes, spaces, slashes or parentheses that could smuggle another option or code).
_MACRO: Final = re.compile(rf"(?:-D|--define-macro=)({_IDENTIFIER})(?:=({_MACRO_VALUE}))?")


def check_options(options: Sequence[str]) -> list[str]:
    """The compiler options, normalized (``-D NAME`` joined into ``-DNAME``), if each is allowed.

    Allowed: ``-std=c++11|14|17|20`` (or ``--std=``), ``--use_fast_math``, ``--fmad=true|false``,
    ``-lineinfo``, and macro definitions with identifier names and plain values. Include paths,
    pre-includes, output and linker options, and anything else are refused: they reach the rig's files.

    Raises:
        ValueError: an option off the allow-list, too many, or too long; the message names it.
    """
    items = list(options)
    if len(items) > MAX_OPTIONS:
        raise ValueError(f"{len(items)} compiler options; at most {MAX_OPTIONS}")
    normalized: list[str] = []
    index = 0
    while index < len(items):
        option = items[index]
        if option == "-D" and index + 1 < len(items):  # "-D", "NAME=VALUE" as two items
            option = "-D" + items[index + 1]
            index += 1
        elif option.startswith("-D "):
            option = "-D" + option[3:].strip()
        index += 1
        if len(option) > MAX_OPTION_LENGTH:
            raise ValueError(f"compiler option of {len(option)} characters; at most {MAX_OPTION_LENGTH}")
        if option in _PLAIN_OPTIONS or _MACRO.fullmatch(option):
            normalized.append(option)
            continue
        raise ValueError(
            f"compiler option {option!r} is not allowed (allowed: -std=c++NN, --use_fast_math, "
            "--fmad=true|false, -lineinfo, -DNAME[=VALUE] with plain names and values)"
        )
    return normalized


def canonical_source(fields: Mapping[str, str]) -> str:
    """One text for a kernel's source fields, the same for sources that differ only in line endings or
    trailing spaces: each field by name, in name order, its lines right-stripped, ``\\r\\n`` as ``\\n``."""
    parts = []
    for name in sorted(fields):
        text = fields[name].replace("\r\n", "\n").replace("\r", "\n")
        text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
        parts.append(f"{name}\x00{len(text)}\x00{text}")
    return "\x01".join(parts)


def cache_key(
    source: str, options: Sequence[str], compute_capability: str, signature: Sequence[str] = ()
) -> tuple[str, str]:
    """The cache key of a kernel: (sha256 hex of its canonical source, options and argument types, the
    device's compute capability). ``signature`` names the argument types a typed kernel (elementwise,
    reduction) is compiled for: CuPy compiles one binary per type combination."""
    digest = hashlib.sha256()
    for part in (source, "\x02".join(options), "\x02".join(signature)):
        digest.update(part.encode())
        digest.update(b"\x03")
    return digest.hexdigest(), compute_capability


def cache_directory(environ: Mapping[str, str] | None = None, home: Path | None = None) -> Path:
    """Where compiled kernels live: ``$GPUPOOL_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/gpupool/kernels``,
    else ``~/.cache/gpupool/kernels``."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV])
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "gpupool" / "kernels"
    return (home if home is not None else Path.home()) / ".cache" / "gpupool" / "kernels"


@dataclass(frozen=True, slots=True)
class CacheCounts:
    """What a cache did since the process started.

    Attributes:
        hits: kernels used without compiling: found in memory, or compiled by an earlier process into the
            same disk cache (those are also counted in ``disk_hits``).
        compiles: kernels compiled here for the first time.
        disk_hits: hits that an earlier process's compile made.
    """

    hits: int = 0
    compiles: int = 0
    disk_hits: int = 0


class KernelCache:
    """Compiled kernels by :func:`cache_key`, in memory, over CuPy's disk cache in ``directory``.

    Thread-safe: workers of one agent share it; a kernel is built once even when two threads ask at once.

    Args:
        directory: the disk cache (created when the first kernel is built); CuPy's ``CUPY_CACHE_DIR``
            is pointed at its ``cupy`` subdirectory.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._kernels: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._counts = CacheCounts()
        self._prepared = False

    @property
    def counts(self) -> CacheCounts:
        """Hits and compiles so far."""
        return self._counts

    def prepare(self) -> None:
        """Create the directory and point CuPy's disk cache there (before anything compiles)."""
        if self._prepared:
            return
        (self.directory / "cupy").mkdir(parents=True, exist_ok=True)
        (self.directory / "keys").mkdir(parents=True, exist_ok=True)
        os.environ["CUPY_CACHE_DIR"] = str(self.directory / "cupy")
        self._prepared = True

    def get(self, key: tuple[str, str], build: Callable[[], Any]) -> Any:
        """The kernel under ``key``; ``build()`` compiles it (and raises the compiler's error) on a miss.

        A compile error is not cached: the next call compiles again (and fails again).
        """
        with self._lock:
            found = self._kernels.get(key)
            if found is not None:
                self._count(hits=1)
                return found
            self.prepare()
            marker = self._marker(key)
            from_disk = marker.exists()
            kernel = build()
            self._kernels[key] = kernel
            if from_disk:
                self._count(hits=1, disk_hits=1)
            else:
                self._count(compiles=1)
                try:
                    marker.touch()
                except OSError:  # a read-only cache still works, it only misses next time
                    pass
            return kernel

    def forget(self, key: tuple[str, str]) -> None:
        """Drop the kernel under ``key`` (its compile failed when it first ran), so the next use compiles."""
        with self._lock:
            self._kernels.pop(key, None)
            try:
                self._marker(key).unlink(missing_ok=True)
            except OSError:
                pass

    def _marker(self, key: tuple[str, str]) -> Path:
        return self.directory / "keys" / f"{key[0]}-sm{key[1].replace('.', '')}"

    def _count(self, *, hits: int = 0, compiles: int = 0, disk_hits: int = 0) -> None:
        now = self._counts
        self._counts = CacheCounts(now.hits + hits, now.compiles + compiles, now.disk_hits + disk_hits)


_shared: KernelCache | None = None
_shared_lock = threading.Lock()


def shared_cache() -> KernelCache:
    """This process's cache, in :func:`cache_directory` (made on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = KernelCache(cache_directory())
        return _shared


def counts() -> CacheCounts:
    """This process's cache counts (all zero before any kernel ran); for telemetry."""
    return _shared.counts if _shared is not None else CacheCounts()
