"""Progress bars for long transfers and computations: shown after about a second, in an interactive terminal.

A :class:`Tracker` wraps one blocking call (an upload, a download, a round of programs). Work reports
itself with :meth:`Tracker.advance` from any thread; if the call is still running after :data:`DELAY`
seconds and progress is on for the session, a `rich <https://rich.readthedocs.io>`_ bar appears on stderr
(bytes or programs done of the total, or a spinner with the elapsed time where there is no total) and is
cleared when the call returns. Calls that finish sooner print nothing; so does everything when progress is
off: ``gp.connect(progress=False)``, or by default when stderr is not a terminal (pipes, CI, log files).
"""

from __future__ import annotations

import os
import sys
import threading
from types import TracebackType
from typing import Final, Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

__all__ = ["DELAY", "Tracker", "progress_default"]

#: Seconds a call runs before its bar appears.
DELAY: Final = 1.0

Unit = Literal["bytes", "programs", "steps", "tasks"]


def progress_default() -> bool:
    """Whether bars show by default: stderr is a terminal and no ``CI`` or ``GPUPOOL_NO_PROGRESS`` is set."""
    if os.environ.get("GPUPOOL_NO_PROGRESS") or os.environ.get("CI"):
        return False
    return sys.stderr.isatty()


class Tracker:
    """Progress of one blocking call; a context manager. Thread-safe.

    Args:
        what: what the bar says (``"upload"``, ``"download"``, ``"compute"``).
        total: the amount of work in ``unit`` (None: unknown, a spinner).
        unit: bytes (a transfer: sizes and speed), programs or steps (a count).
        enabled: whether a bar may show at all.
        delay: seconds before it shows.
        console: where it draws (default: stderr).
    """

    def __init__(
        self,
        what: str,
        *,
        total: int | None = None,
        unit: Unit = "steps",
        enabled: bool,
        delay: float = DELAY,
        console: Console | None = None,
    ) -> None:
        self.what = what
        self.total = total
        self.unit = unit
        self.done = 0
        self.enabled = enabled
        self._delay = delay
        self._console = console
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether its call has returned."""
        return self._closed

    @property
    def shown(self) -> bool:
        """Whether the bar has appeared."""
        return self._progress is not None

    def __enter__(self) -> Tracker:
        if self.enabled:
            self._timer = threading.Timer(self._delay, self._show)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            progress, self._progress = self._progress, None
        if progress is not None:
            progress.stop()

    def advance(self, amount: int = 1) -> None:
        """Count ``amount`` more units of work done."""
        with self._lock:
            self.done += amount
            if self._progress is not None and self._task is not None:
                self._progress.update(self._task, completed=self.done)

    def _columns(self) -> list[object]:
        if self.total is None:
            return [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
        if self.unit == "bytes":
            counted: list[object] = [DownloadColumn(binary_units=True), TransferSpeedColumn()]
        else:
            counted = [MofNCompleteColumn(), TextColumn(self.unit)]
        return [TextColumn("{task.description}"), BarColumn(), *counted, TimeElapsedColumn()]

    def _show(self) -> None:
        with self._lock:
            if self._closed:
                return
            console = self._console or Console(stderr=True)
            progress = Progress(*self._columns(), console=console, transient=True)  # type: ignore[arg-type]
            self._task = progress.add_task(f"gpupool {self.what}", total=self.total, completed=self.done)
            progress.start()
            self._progress = progress
