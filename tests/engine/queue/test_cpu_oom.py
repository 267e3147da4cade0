"""A failed CPU allocation is out of memory, as CUDA's is: caches freed, that job failed with advice, the next runs.

The error is torch's own: `torch.empty` of 2**50 bytes (1 PiB) on the CPU raises "DefaultCPUAllocator:
can't allocate memory". No workflow within config.toml's limits asks for that much (that is what the
limits are for), so a node class made here asks for it; the queue, the worker and the caches are real.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from pydantic import Field

from engine.errors import JobFailed, NodeExecutionError
from engine.nodes.base import Node, Output, RunContext
from engine.queue import Owner
from engine.queue.worker import is_out_of_memory, message_for
from tests.engine.conftest import txt2img
from tests.engine.queue.service_support import TIMEOUT, QueueEnv, rows

PIB = 2**50
ADVICE = ("the machine ran out of memory while running node 1 (AllocateBytes), asking for 1.0 PiB at once; "
          "the caches were freed: try a smaller size or batch, or fewer LoRAs")
ANN = Owner("ann")


class AllocateBytes(Node):
    """Test only: allocate `nbytes` bytes on the CPU, as a node making a huge tensor would."""

    OUTPUT_NODE: ClassVar[bool] = True
    nbytes: int = Field(1, ge=1, le=2**62)

    def run(self, ctx: RunContext) -> Output:
        torch.empty(self.nbytes, dtype=torch.uint8)
        return Output()


def real_allocation_failure() -> RuntimeError:
    try:
        torch.empty(PIB, dtype=torch.uint8)
    except RuntimeError as err:
        return err
    raise AssertionError("this machine allocated 1 PiB")


def test_the_cpu_allocators_own_error_is_out_of_memory_with_advice() -> None:
    err = real_allocation_failure()
    assert "DefaultCPUAllocator: can't allocate memory" in str(err)
    wrapped = NodeExecutionError("1", "AllocateBytes", err)
    assert is_out_of_memory(err) and is_out_of_memory(wrapped)
    assert message_for(wrapped, torch.device("cpu")) == ADVICE
    # on a GPU machine it is still the machine's RAM that ran out, not the GPU's
    assert message_for(wrapped, torch.device("cuda")) == ADVICE
    assert not is_out_of_memory(NodeExecutionError("1", "AllocateBytes", RuntimeError("shape mismatch")))


async def test_a_job_whose_allocation_fails_frees_the_caches_and_the_next_job_runs(
        queue_env: QueueEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(Node.registry, "AllocateBytes", AllocateBytes)
    executor = queue_env.executor
    service = await queue_env.start(batch_max=1)
    warm = await service.submit(txt2img(seed=301), ANN)
    await warm.result(timeout=TIMEOUT)
    assert len(executor.cache) > 0 and executor.models.loaded_names()

    huge = await service.submit({"1": {"class_type": "AllocateBytes", "inputs": {"nbytes": PIB}}}, ANN)
    after = await service.submit(txt2img(seed=302), ANN)
    with pytest.raises(JobFailed) as failed:
        await huge.result(timeout=TIMEOUT)
    assert str(failed.value) == ADVICE
    assert rows(queue_env.db)[huge.job_id]["state"] == "failed"

    meta = (await after.result(timeout=TIMEOUT))["meta"]
    # the same checkpoint and negative prompt as the warm-up job: only freed caches make it load and encode again
    assert meta["models"]["misses"] == 1 and meta["cached"] == []
