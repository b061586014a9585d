"""A worker per process: a fault or a hang in one ends only that worker's process; the agent answers the
caller precisely, marks the buffers the process held as lost, starts a fresh process, and keeps serving.

Real agent processes, real signals and a real segfault: the NumPy worker is a process too, and the agent's
fault-injection op (honoured only with ``GPUPOOL_FAULT_INJECTION=1``) does to it what a faulting or hung
kernel does to a CuPy worker. ``test_worker_process_gpu.py`` runs a real illegal-address kernel on a GPU.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import numpy as np
import psutil
import pytest

from gpupool._errors import BufferNotFound, DeadlineExceeded, RemoteKernelError
from gpupool._process import Child
from gpupool._proto.v1 import agent_pb2
from gpupool.agent.backend import NumpyBackend
from gpupool.agent.measure import SLOWDOWN_ENV
from gpupool.agent.procworker import MAX_DEATHS, WORKER_COMMAND, ProcessWorker
from gpupool.agent.workerproc import FAULT_INJECTION_ENV, FAULT_OP
from gpupool.agent.workers import Worker
from gpupool.protocol.errors import translate_rpc_error
from gpupool.protocol.topics import Topics

from .agent_helpers import (
    agent_stub,
    buffer,
    clear_retained,
    download,
    new_prefix,
    op,
    refused,
    run,
    scalar,
    start_agent,
    upload,
)


@pytest.fixture
def faulty_agent(system_broker_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Child]:
    """A NumPy agent (worker in its own process) that honours the fault-injection op."""
    monkeypatch.setenv(FAULT_INJECTION_ENV, "1")
    prefix = new_prefix()
    child = start_agent(system_broker_url, prefix, "--backend", "numpy")
    try:
        yield child
    finally:
        child.stop()
        run(clear_retained(system_broker_url, Topics(prefix).status(child.ready["agent_id"])))


def fault(how: str) -> agent_pb2.Op:
    request = agent_pb2.Op(op=FAULT_OP)
    request.kernel.name = how
    return request


def worker_pids(agent: Child) -> list[int]:
    """The agent's worker processes (its children running gpupool.agent.workerproc)."""
    parent = psutil.Process(agent.process.pid)
    return [p.pid for p in parent.children() if WORKER_COMMAND in p.cmdline()]


async def until_serving(stub: object, session: str, deadline: float = 60.0) -> float:
    """Seconds until the worker runs a program again (a fresh process, after a death)."""
    start = time.monotonic()
    while True:
        try:
            await stub.Execute(  # type: ignore[attr-defined]
                agent_pb2.ExecuteRequest(
                    session=session, ops=[op("full", [scalar(2.0)], "probe", "float64", (3,))], free=["probe"]
                ),
                timeout=10,
            )
            return time.monotonic() - start
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if time.monotonic() - start > deadline or not ("restarting" in details or "process" in details):
                raise
            await asyncio.sleep(0.1)


def test_a_segfault_ends_only_the_worker_process_and_its_buffers(faulty_agent: Child) -> None:
    endpoint = faulty_agent.ready["endpoint"]
    agent_pid = faulty_agent.process.pid
    before = worker_pids(faulty_agent)
    assert len(before) == 1, "a NumPy agent serves its worker from one process of its own"
    data = np.arange(1000, dtype=np.float32)

    async def body() -> None:
        async with agent_stub(endpoint) as stub:
            await upload(stub, "mine", data, session="a")
            await upload(stub, "theirs", data * 2, session="b")
            call = stub.Execute(agent_pb2.ExecuteRequest(session="a", ops=[fault("segfault")]), timeout=30)
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                error = translate_rpc_error(exc, peer=endpoint)
            else:
                raise AssertionError("a segfaulting program returned")
            assert isinstance(error, RemoteKernelError)
            assert "SIGSEGV" in str(error), str(error)
            assert "buffers are lost" in str(error), str(error)
            # The agent itself carries on: Health answers at once.
            reply = await stub.Health(agent_pb2.HealthRequest(), timeout=5)
            assert reply.status.agent_id
            # Every buffer the process held is gone, and the refusal says why (for both sessions).
            for buffer_id in ("mine", "theirs"):
                code, kind, details = await refused(download(stub, buffer_id))
                assert (code, kind) == (grpc.StatusCode.NOT_FOUND, "buffer-not-found")
                assert "was lost" in details, details
                assert "SIGSEGV" in details, details
            # A fresh process serves the worker; new work runs.
            await until_serving(stub, "b")
            await upload(stub, "again", data, session="b")
            got = await stub.Execute(
                agent_pb2.ExecuteRequest(
                    session="b",
                    ops=[op("add", [buffer("again"), scalar(1.0)], "plus", "float32", (1000,))],
                    fetch=["plus"],
                ),
                timeout=30,
            )
            assert np.frombuffer(got.fetched[0].data, np.float32).tolist() == (data + 1).tolist()

    run(body())
    assert faulty_agent.process.poll() is None
    assert psutil.pid_exists(agent_pid)
    after = worker_pids(faulty_agent)
    assert len(after) == 1, (before, after)
    assert after != before, (before, after)


def test_a_hung_program_is_killed_once_its_caller_gives_up(faulty_agent: Child) -> None:
    """A kernel stuck on the device ignores cancellation: past the caller's deadline and a short grace,
    the agent kills the worker's process, marks its buffers lost and restarts it."""
    endpoint = faulty_agent.ready["endpoint"]
    before = worker_pids(faulty_agent)

    async def body() -> None:
        async with agent_stub(endpoint) as stub:
            await upload(stub, "kept", np.ones(10, np.float32), session="a")
            try:
                await stub.Execute(agent_pb2.ExecuteRequest(session="a", ops=[fault("hang")]), timeout=1.5)
            except grpc.aio.AioRpcError as exc:
                error = translate_rpc_error(exc, peer=endpoint)
            else:
                raise AssertionError("a hung program returned")
            assert isinstance(error, DeadlineExceeded), repr(error)
            # The hung process is killed after the grace, its buffers lost; a new one serves.
            waited = await until_serving(stub, "a")
            code, _, details = await refused(download(stub, "kept"))
            assert code == grpc.StatusCode.NOT_FOUND, details
            assert "did not stop" in details, details
            print(f"hung worker replaced {waited:.1f} s after the caller gave up")

    run(body())
    assert worker_pids(faulty_agent) != before


def test_a_worker_process_killed_from_outside_is_replaced(faulty_agent: Child) -> None:
    """What the kernel's OOM killer, or a SIGKILL from the rig's owner, does to a worker process."""
    endpoint = faulty_agent.ready["endpoint"]
    (victim,) = worker_pids(faulty_agent)

    async def body() -> None:
        async with agent_stub(endpoint) as stub:
            await upload(stub, "x", np.ones(100, np.float32), session="a")
            os.kill(victim, signal.SIGKILL)
            await until_serving(stub, "a")
            code, _, details = await refused(download(stub, "x"))
            assert code == grpc.StatusCode.NOT_FOUND, details
            assert "SIGKILL" in details, details
            error = translate_rpc_error(await _rpc_error(download(stub, "x")), peer=endpoint)
            assert isinstance(error, BufferNotFound)

    run(body())
    assert faulty_agent.process.poll() is None


def test_a_stopped_worker_process_is_killed_at_the_callers_deadline(faulty_agent: Child) -> None:
    """SIGSTOP of the worker process mid-program: the program cannot end; the agent kills the process
    once the caller gives up, and serves again."""
    endpoint = faulty_agent.ready["endpoint"]
    (victim,) = worker_pids(faulty_agent)

    async def body() -> None:
        async with agent_stub(endpoint) as stub:
            os.kill(victim, signal.SIGSTOP)
            code, _, _ = await refused(
                stub.Execute(
                    agent_pb2.ExecuteRequest(
                        session="a", ops=[op("full", [scalar(1.0)], "y", "float64", (4,))]
                    ),
                    timeout=1.5,
                )
            )
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            await until_serving(stub, "a")

    run(body())
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    assert faulty_agent.process.poll() is None


def test_a_sticky_cuda_error_answers_then_restarts_the_worker(faulty_agent: Child) -> None:
    """After an illegal address the CUDA context is unusable: the caller gets the CUDA message, and the
    process ends by itself so that a fresh context serves the next program."""
    endpoint = faulty_agent.ready["endpoint"]
    before = worker_pids(faulty_agent)

    async def body() -> None:
        async with agent_stub(endpoint) as stub:
            _, kind, details = await refused(
                stub.Execute(agent_pb2.ExecuteRequest(session="a", ops=[fault("sticky")]), timeout=30)
            )
            assert kind == "kernel-failed", details
            assert "illegal memory access" in details, details
            await until_serving(stub, "a")

    run(body())
    assert worker_pids(faulty_agent) != before


def test_the_fault_op_is_refused_without_the_test_flag(system_broker_url: str) -> None:
    prefix = new_prefix()
    child = start_agent(system_broker_url, prefix, "--backend", "numpy")
    try:
        before = worker_pids(child)

        async def body() -> None:
            async with agent_stub(child.ready["endpoint"]) as stub:
                code, kind, details = await refused(
                    stub.Execute(agent_pb2.ExecuteRequest(session="a", ops=[fault("segfault")]), timeout=30)
                )
                assert code == grpc.StatusCode.INVALID_ARGUMENT, details
                assert kind == "bad-request", details

        run(body())
        assert worker_pids(child) == before
    finally:
        child.stop()
        run(clear_retained(system_broker_url, Topics(prefix).status(child.ready["agent_id"])))


async def _rpc_error(call: object) -> grpc.aio.AioRpcError:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


def test_a_worker_that_keeps_dying_stays_down_and_says_why(faulty_agent: Child) -> None:
    """MAX_DEATHS deaths within DEATH_WINDOW: no more restarts; calls are refused with the reason."""
    endpoint = faulty_agent.ready["endpoint"]

    async def body() -> None:
        async with agent_stub(endpoint) as stub:
            for _ in range(MAX_DEATHS):
                await until_serving(stub, "a")
                _, kind, _ = await refused(
                    stub.Execute(agent_pb2.ExecuteRequest(session="a", ops=[fault("abort")]), timeout=30)
                )
                assert kind == "kernel-failed"
            await asyncio.sleep(1.0)  # longer than any restart's first wait
            code, kind, details = await refused(upload(stub, "late", np.ones(4, np.float32), session="a"))
            assert (code, kind) == (grpc.StatusCode.FAILED_PRECONDITION, "not-accepting"), details
            assert "stays down" in details, details
            assert "SIGABRT" in details, details
            # Its status offers no memory there (placement skips it) and says why.
            status = (await stub.Health(agent_pb2.HealthRequest(), timeout=5)).status
            assert status.workers[0].memory_limit == 0
            assert "stays down" in status.note, status.note

    run(body(), timeout=120)
    assert worker_pids(faulty_agent) == []
    assert faulty_agent.process.poll() is None


def test_shared_arrays_reuse_freed_memory_without_leaking_its_bytes(faulty_agent: Child) -> None:
    """A NumPy worker's big arrays live in memory files the agent maps; a freed one's file is reused, and
    what the next array returns is only its own data (uploads, program results, rows)."""
    endpoint = faulty_agent.ready["endpoint"]
    big = np.full(3 << 18, 7.0, np.float32)  # 3 MiB
    smaller = np.arange(1 << 19, dtype=np.float32)  # 2 MiB, into the 3 MiB file

    async def body() -> None:
        async with agent_stub(endpoint) as stub:
            await upload(stub, "old", big, session="a")
            await stub.Free(agent_pb2.FreeRequest(buffer_ids=["old"]), timeout=10)
            await upload(stub, "new", smaller, session="b")
            np.testing.assert_array_equal(await download(stub, "new"), smaller)
            await stub.Execute(
                agent_pb2.ExecuteRequest(
                    session="b",
                    ops=[op("multiply", [buffer("new"), scalar(3.0)], "made", "float32", smaller.shape)],
                ),
                timeout=30,
            )
            np.testing.assert_array_equal(await download(stub, "made"), smaller * 3)
            rows = agent_pb2.DownloadRequest(buffer_id="made", has_rows=True, start=10, stop=20)
            meta_and_data = [message async for message in stub.Download(rows, timeout=30)]
            data = b"".join(m.chunk for m in meta_and_data if m.WhichOneof("kind") == "chunk")
            np.testing.assert_array_equal(np.frombuffer(data, np.float32), smaller[10:20] * 3)

    run(body())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_group_stops_the_agent_first_and_leaves_no_worker(
    system_broker_url: str, signum: int
) -> None:
    """Ctrl-C in a terminal and systemd's stop signal every process of the agent at once: the worker
    process ignores it, the agent stops cleanly and ends its worker, and nothing is reported as a death."""
    argv = [sys.executable, "-m", "gpupool.agent", "--broker", system_broker_url, "--listen", "127.0.0.1:0"]
    argv += ["--topic-prefix", new_prefix(), "--name", "grouped", "--insecure", "--backend", "numpy"]
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline(), "the agent did not say it was ready"  # its worker serves by now
        (worker,) = [p for p in psutil.Process(process.pid).children() if WORKER_COMMAND in p.cmdline()]
        os.killpg(process.pid, signum)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    text = stderr.decode(errors="replace")
    assert process.returncode == 0, text[-2000:]
    assert "its process ended" not in text, text[-2000:]
    assert "Traceback" not in text, text[-2000:]
    assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE


def test_a_worker_process_measures_its_speed_at_start_and_again_when_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def body() -> tuple[float, float, float]:
        planned = Worker(index=0, backend=NumpyBackend(0), memory_limit=1 << 26)
        worker = ProcessWorker(planned, on_lost=lambda *_: None)
        await worker.start()
        try:
            assert worker.idle()
            at_start = worker.measured.gemm_f32_gflops
            again = (await worker.remeasure()).gemm_f32_gflops
        finally:
            worker.shutdown()
        monkeypatch.setenv(SLOWDOWN_ENV, "1000")  # a card a thousand times slower
        slowed = ProcessWorker(Worker(index=0, backend=NumpyBackend(0), memory_limit=1 << 26), on_lost=print)
        await slowed.start()
        try:
            return at_start, again, slowed.measured.gemm_f32_gflops
        finally:
            slowed.shutdown()

    at_start, again, slowed = run(body())
    print(f"float32 GEMM: {at_start:.1f} GFLOP/s at start, {again:.1f} again, {slowed:.3f} slowed 1000x")
    assert at_start > 0
    assert again > 0
    assert 0 < slowed < min(at_start, again) / 50
