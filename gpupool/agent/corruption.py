"""Wrong answers on purpose: a worker process that corrupts a fraction of its programs' results (tests of
result verification: a faulty or dishonest rig).

Honoured only where the agent runs with ``GPUPOOL_FAULT_INJECTION=1``; then
``GPUPOOL_FAULT_CORRUPT=<fraction>[:<seed>]`` (seed 0 by default) makes each worker process change one value
of the first result of about that fraction of its programs. A program's results are the outputs it keeps
or fetches, in op order; a program with none is not counted. The choice is deterministic: the ``n``-th
counted program of worker ``w`` is corrupted when ``random.Random(f"{seed}:{w}:{n}").random() < fraction``,
and the same generator picks the element. The kept buffer and the fetched bytes carry the same wrong value,
which differs from the right one by at least 1 (a bool is negated; a NaN or an infinity becomes 0), far
beyond any tolerance a comparison allows. The count starts again in a restarted worker process.

Each corruption is logged by the worker process as a WARNING, ``fault injection: corrupted ...; N of M
programs corrupted so far`` (:data:`LOG_MARK` starts it), which is how tests count them. Workers run inside
the agent's process (``--in-process-workers``) never corrupt anything.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from gpupool._proto.v1 import agent_pb2
from gpupool.protocol.codec import op_outputs, shape_of

__all__ = [
    "CORRUPT_ENV",
    "LOG_MARK",
    "Chosen",
    "CorruptSetting",
    "Corrupter",
    "Corruption",
    "corrupt",
    "first_result",
    "wrong_value",
]

#: ``<fraction>[:<seed>]``: the fraction of programs whose first result a worker process corrupts (tests).
CORRUPT_ENV: Final = "GPUPOOL_FAULT_CORRUPT"
#: How each corruption's log line starts.
LOG_MARK: Final = "fault injection: corrupted"


@dataclass(frozen=True, slots=True)
class CorruptSetting:
    """What :data:`CORRUPT_ENV` asks for."""

    fraction: float
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> CorruptSetting:
        """``"0.25"`` or ``"0.25:7"``.

        Raises:
            ValueError: not a fraction in [0, 1] with an optional integer seed (the message quotes it).
        """
        fraction_text, _, seed_text = text.strip().partition(":")
        try:
            fraction = float(fraction_text)
            seed = int(seed_text) if seed_text else 0
        except ValueError:
            fraction, seed = math.nan, 0
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{CORRUPT_ENV}={text!r}: expected <fraction in [0, 1]>[:<integer seed>]")
        return cls(fraction, seed)


def first_result(request: agent_pb2.ExecuteRequest) -> str | None:
    """The first output of the program, in op order, that it keeps or fetches; None if there is none."""
    dropped = set(request.free)
    fetched = set(request.fetch)
    for op in request.ops:
        for output in op_outputs(op):
            if output and (output in fetched or output not in dropped):
                return output
    return None


def wrong_value(value: np.ndarray) -> np.ndarray:
    """A 0-d array of ``value``'s dtype whose value is certainly not ``value``'s (see the module's text)."""
    right = np.asarray(value).reshape(())
    dtype = right.dtype
    wrong: np.ndarray
    with np.errstate(all="ignore"):  # an integer at its top wraps, a large float16 overflows: still wrong
        if dtype == np.bool_:
            wrong = np.logical_not(right)
        elif dtype.kind in "iu":
            wrong = right + np.ones((), dtype)
        elif not np.isfinite(right):
            wrong = np.zeros((), dtype)
        else:
            wrong = right + np.ones((), dtype) + np.abs(right)
    return np.asarray(wrong, dtype).reshape(())


@dataclass(frozen=True, slots=True)
class Chosen:
    """A program picked for corruption: its result to change, and the generator that picks the element."""

    buffer_id: str
    rng: random.Random


class Corrupter:
    """Decides, program by program, which to corrupt; counts. Thread-safe (programs run in several threads).

    Args:
        setting: the fraction and seed.
        worker: the worker's index (part of each program's seed).
    """

    def __init__(self, setting: CorruptSetting, *, worker: int) -> None:
        self.setting = setting
        self._worker = worker
        self._lock = threading.Lock()
        #: Programs with a result seen so far, and how many of them were corrupted.
        self.programs = 0
        self.corrupted = 0

    def choose(self, request: agent_pb2.ExecuteRequest) -> Chosen | None:
        """Count the program if it has a result; which result to corrupt, or None to leave it be."""
        target = first_result(request)
        if target is None:
            return None
        with self._lock:
            self.programs += 1
            number = self.programs
        rng = random.Random(f"{self.setting.seed}:{self._worker}:{number}")
        if rng.random() >= self.setting.fraction:
            return None
        return Chosen(target, rng)

    def count(self) -> tuple[int, int]:
        """Count one corruption made; (corrupted, programs) so far."""
        with self._lock:
            self.corrupted += 1
            return self.corrupted, self.programs


@dataclass(frozen=True, slots=True)
class Corruption:
    """One result changed: where, from what to what.

    Attributes:
        kept: the kept array, corrupted (a copy: a kept view must not corrupt the array it views);
            None where the result is fetched only.
        fetched: whether the reply's fetched bytes were changed too.
    """

    buffer_id: str
    index: tuple[int, ...]
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    right: Any
    wrong: Any
    kept: Any
    fetched: bool

    def describe(self) -> str:
        """One line for the log, starting with :data:`LOG_MARK`."""
        where = " and ".join(
            w for w, held in (("kept", self.kept is not None), ("fetched", self.fetched)) if held
        )
        return (
            f"{LOG_MARK} {self.buffer_id} ({where}), element {list(self.index)} of "
            f"{self.dtype.name}{list(self.shape)}: {self.right!r} -> {self.wrong!r}"
        )


def corrupt(
    chosen: Chosen, reply: agent_pb2.ExecuteReply, kept: Any, *, to_host: Callable[[Any], np.ndarray]
) -> Corruption | None:
    """Change one element of the result ``chosen`` names: in ``reply``'s fetched bytes (in place) and in a
    copy of ``kept`` (the array the program keeps, or None); None where the result is empty.

    Args:
        chosen: from :meth:`Corrupter.choose`.
        reply: the program's reply.
        kept: the kept array (NumPy or CuPy), or None.
        to_host: the worker's backend's copy to host memory.
    """
    fetched = next((item for item in reply.fetched if item.buffer_id == chosen.buffer_id), None)
    if kept is not None:
        dtype, shape = np.dtype(kept.dtype), tuple(int(n) for n in kept.shape)
    elif fetched is not None:
        dtype, shape = np.dtype(fetched.meta.dtype), shape_of(fetched.meta)
    else:
        return None
    size = math.prod(shape)
    if size == 0:
        return None
    flat = chosen.rng.randrange(size)
    index = tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()
    if fetched is not None:
        right = np.frombuffer(fetched.data, dtype, count=1, offset=flat * dtype.itemsize)
    else:
        right = to_host(kept[index])
    wrong = wrong_value(right)
    if fetched is not None:
        data = bytearray(fetched.data)
        data[flat * dtype.itemsize : (flat + 1) * dtype.itemsize] = wrong.tobytes()
        fetched.data = bytes(data)
    copy = None
    if kept is not None:
        copy = kept.copy()
        copy[index] = wrong.item()  # a Python scalar: a CuPy array takes no NumPy array as a value
    return Corruption(
        chosen.buffer_id,
        index,
        dtype,
        shape,
        np.asarray(right).reshape(()).item(),
        wrong.item(),
        copy,
        fetched is not None,
    )
