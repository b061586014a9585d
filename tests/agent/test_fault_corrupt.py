"""An agent that returns wrong answers on purpose (tests of result verification): with
``GPUPOOL_FAULT_INJECTION=1`` and ``GPUPOOL_FAULT_CORRUPT=<fraction>[:<seed>]`` each worker process changes
one value of the first result of that fraction of its programs, chosen from the seed and a count, kept
and fetched alike, and logs each one; without fault injection the setting is ignored.

Real agent processes (NumPy workers in processes of their own), their logs read from a file.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from gpupool._config import SUPPORTED_DTYPES
from gpupool._process import Child
from gpupool._proto.v1 import agent_pb2
from gpupool.agent.corruption import (
    CORRUPT_ENV,
    LOG_MARK,
    Chosen,
    CorruptSetting,
    corrupt,
    first_result,
    wrong_value,
)
from gpupool.agent.workerproc import FAULT_INJECTION_ENV
from gpupool.protocol.codec import meta_of
from gpupool.protocol.topics import Topics

from .agent_helpers import (
    agent_stub,
    buffer,
    clear_retained,
    download,
    fetched_array,
    new_prefix,
    op,
    run,
    scalar,
    start_agent,
    upload,
)

SEED = 7
FRACTION = 0.5
PROGRAMS = 30


def start(broker_url: str, log: Path, env: dict[str, str]) -> tuple[Child, str]:
    """A NumPy agent (its worker in a process of its own) logging to ``log``; returns it and its prefix."""
    prefix = new_prefix()
    with log.open("wb") as stream:
        return start_agent(
            broker_url, prefix, "--backend", "numpy", name="liar", env=env, stderr=stream
        ), prefix


@pytest.fixture
def agent_with(
    system_broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[dict[str, str]], tuple[Child, Path]]]:
    started: list[tuple[Child, str]] = []

    def make(env: dict[str, str]) -> tuple[Child, Path]:
        for name in (FAULT_INJECTION_ENV, CORRUPT_ENV):
            monkeypatch.delenv(name, raising=False)
        log = tmp_path / f"agent{len(started)}.log"
        started.append(start(system_broker_url, log, env))
        return started[-1][0], log

    yield make
    for child, prefix in started:
        child.stop()
        run(clear_retained(system_broker_url, Topics(prefix).status(child.ready["agent_id"])))


async def run_programs(endpoint: str, data: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
    """Program ``i`` adds ``i`` to ``data``, its result kept and fetched (i % 3 == 0), kept only (1), or
    fetched only (2); what came back of each, by where it was read."""
    results: dict[int, dict[str, np.ndarray]] = {}
    async with agent_stub(endpoint) as stub:
        await upload(stub, "x", data)
        for i in range(PROGRAMS):
            out = f"y{i}"
            fetch = [] if i % 3 == 1 else [out]
            request = agent_pb2.ExecuteRequest(
                session="test",
                ops=[op("add", [buffer("x"), scalar(float(i))], out, "float64", data.shape)],
                fetch=fetch,
                free=[out] if i % 3 == 2 else [],
            )
            reply = await stub.Execute(request, timeout=30)
            results[i] = {}
            if fetch:
                results[i]["fetched"] = fetched_array(reply.fetched[0]).copy()
            if i % 3 != 2:
                results[i]["kept"] = await download(stub, out)
    return results


def test_a_corrupting_agent_changes_one_value_of_the_programs_it_picks_and_logs_each(
    agent_with: Callable[[dict[str, str]], tuple[Child, Path]],
) -> None:
    child, log = agent_with({FAULT_INJECTION_ENV: "1", CORRUPT_ENV: f"{FRACTION}:{SEED}"})
    data = np.arange(1000, dtype=np.float64)
    results = run(run_programs(str(child.ready["endpoint"]), data))
    corrupted = set()
    for i, seen in results.items():
        expected = data + i
        wrong = {where: int(np.count_nonzero(got != expected)) for where, got in seen.items()}
        assert set(wrong.values()) <= {0, 1}, (i, wrong)  # one value at the most
        if len(seen) == 2:  # kept and fetched: the same wrong value in both
            np.testing.assert_array_equal(seen["kept"], seen["fetched"])
        if any(wrong.values()):
            corrupted.add(i)
    # Deterministic: program n (counting from 1) of worker 0 is corrupted when its draw is under the fraction.
    chosen = {i for i in range(PROGRAMS) if random.Random(f"{SEED}:0:{i + 1}").random() < FRACTION}
    assert corrupted == chosen
    assert 0 < len(corrupted) < PROGRAMS
    lines = [line for line in log.read_text().splitlines() if LOG_MARK in line]
    assert len(lines) == len(corrupted), lines
    last = max(corrupted) + 1  # the count when the last corruption was made
    assert re.search(rf"; {len(corrupted)} of {last} programs corrupted so far$", lines[-1]), lines[-1]
    print(f"{len(corrupted)} of {PROGRAMS} programs corrupted; the last: {lines[-1]}")


def test_without_fault_injection_the_setting_is_ignored(
    agent_with: Callable[[dict[str, str]], tuple[Child, Path]],
) -> None:
    child, log = agent_with({CORRUPT_ENV: "1"})  # every program, were it honoured
    data = np.arange(1000, dtype=np.float64)
    results = run(run_programs(str(child.ready["endpoint"]), data))
    for i, seen in results.items():
        for got in seen.values():
            np.testing.assert_array_equal(got, data + i)
    text = log.read_text()
    assert f"{CORRUPT_ENV} is set but ignored" in text
    assert LOG_MARK not in text


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_a_wrong_value_differs_by_at_least_one(dtype: str) -> None:
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    values = [0, 1, info.max, info.min] if info is not None else [0, 1, -0.25, -1e4, 3e4]
    if np.dtype(dtype).kind in "fc":
        values += [np.nan, np.inf, -np.inf]
    if dtype == "bool":
        values = [False, True]
    for value in values:
        right = np.asarray(value, dtype=dtype)
        wrong = wrong_value(right)
        assert wrong.dtype == right.dtype
        assert wrong.shape == ()
        assert not np.array_equal(wrong, right, equal_nan=True), (dtype, value, wrong)
        if dtype != "bool" and np.isfinite(right):
            gap = abs(wrong.item() - right.item())  # Python numbers: exact for int64 and uint64
            assert gap >= 1, (dtype, value, wrong)


def test_the_setting_and_the_result_picked() -> None:
    assert CorruptSetting.parse("0.25") == CorruptSetting(0.25, 0)
    assert CorruptSetting.parse(" 1:42 ") == CorruptSetting(1.0, 42)
    for bad in ("", "x", "1.5", "-0.1", "0.5:x", "nan"):
        with pytest.raises(ValueError, match=CORRUPT_ENV):
            CorruptSetting.parse(bad)
    program = agent_pb2.ExecuteRequest(
        ops=[
            op("add", [buffer("x"), scalar(1.0)], "t", "float64", (3,)),
            op("mul", [buffer("t"), scalar(2.0)], "u", "float64", (3,)),
        ],
        free=["t", "u"],
        fetch=["u"],
    )
    assert first_result(program) == "u"  # t is an intermediate: dropped, not fetched
    del program.fetch[:]
    assert first_result(program) is None  # nothing kept or fetched: not counted


def test_a_kept_view_is_corrupted_as_a_copy_and_the_fetched_bytes_alike() -> None:
    """A kept result that views another array (a transpose, say) is replaced, not written through."""
    base = np.arange(12, dtype=np.int32).reshape(3, 4)
    kept = base.T
    reply = agent_pb2.ExecuteReply(
        fetched=[agent_pb2.Fetched(buffer_id="t", meta=meta_of(kept.dtype, kept.shape), data=kept.tobytes())]
    )
    made = corrupt(Chosen("t", random.Random(1)), reply, kept, to_host=np.asarray)
    assert made is not None
    assert made.fetched
    np.testing.assert_array_equal(base, np.arange(12, dtype=np.int32).reshape(3, 4))  # untouched
    got = fetched_array(reply.fetched[0])
    np.testing.assert_array_equal(got, made.kept)
    assert np.count_nonzero(got != kept) == 1
    assert got[made.index] == made.wrong
    assert kept[made.index] == made.right
    assert made.describe().startswith(
        f"{LOG_MARK} t (kept and fetched), element {list(made.index)} of int32[4, 3]"
    )
    empty = np.zeros((0, 3))
    assert corrupt(Chosen("e", random.Random(1)), agent_pb2.ExecuteReply(), empty, to_host=np.asarray) is None
