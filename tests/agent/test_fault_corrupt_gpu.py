"""The corrupting test agent's CuPy path (skipped without CUDA): a kept result on the GPU is replaced by a
corrupted copy made on the device, the array it came from is untouched, and the fetched bytes carry the
same wrong value. The NumPy twin is ``test_fault_corrupt.py``'s kept-view test."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.corruption import Chosen, corrupt
from gpupool.protocol.codec import meta_of

pytestmark = pytest.mark.gpu


def test_a_kept_result_on_the_gpu_is_corrupted_as_a_device_copy() -> None:
    cupy = pytest.importorskip("cupy")
    base = cupy.arange(12, dtype=cupy.float32).reshape(3, 4)
    kept = base.T  # a view, as a transpose result may be
    host = cupy.asnumpy(kept)
    reply = agent_pb2.ExecuteReply(
        fetched=[agent_pb2.Fetched(buffer_id="t", meta=meta_of(host.dtype, host.shape), data=host.tobytes())]
    )
    made = corrupt(Chosen("t", random.Random(3)), reply, kept, to_host=cupy.asnumpy)
    assert made is not None
    assert isinstance(made.kept, cupy.ndarray)  # stays on the device
    np.testing.assert_array_equal(cupy.asnumpy(base), np.arange(12, dtype=np.float32).reshape(3, 4))
    corrupted = cupy.asnumpy(made.kept)
    assert np.count_nonzero(corrupted != host) == 1
    assert corrupted[made.index] == made.wrong
    assert abs(made.wrong - made.right) >= 1
    fetched = np.frombuffer(reply.fetched[0].data, np.float32).reshape(host.shape)
    np.testing.assert_array_equal(fetched, corrupted)
