"""The handoff worker (cadenza.kernels.handoff, handoff.cpp): a CPU thread that runs a job when a word of memory asks.

CI (any Linux CPU: the worker needs no AVX-512): the test plays the GPU's part, writing the request word and waiting
for the answer as cuStreamWriteValue32 / cuStreamWaitValue32 do; jobs run in order, once per request, with their
inputs and results where the protocol says; the fused CPU kernel's job, run by the worker from a `Block`, gives
exactly what `job_run` gives; the worker naps when idle, still answers after, and stops cleanly, idle or not. The
launch choice is a pure function. The CUDA side (stream memory operations, the mapping, graphs) is covered on the
device: tests/test_streamed.py, `pytest -m gpu`.
"""

from __future__ import annotations

import ctypes
import time

import pytest
import torch

from cadenza.kernels import cpu_moe, handoff
from cadenza.moe.offload.policy import choose_launch

pytestmark = pytest.mark.skipif(
    handoff.unavailable_reason() is not None,
    reason=f"the handoff worker does not build: {handoff.unavailable_reason()}",
)

_JOB = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class PyJobs:
    """Jobs written in Python (ctypes callbacks: the worker's thread takes the GIL to run them): job i reads
    inputs[i] and writes outputs[i] = 2 inputs[i] + i, counting its runs."""

    def __init__(self, n: int):
        self.inputs = [torch.zeros(64) for _ in range(n)]
        self.outputs = [torch.full((64,), float("nan")) for _ in range(n)]
        self.runs = [0] * n
        self.callback = _JOB(self._run)  # (kept alive as long as the worker may call it)
        self.fn = ctypes.cast(self.callback, ctypes.c_void_p).value

    def _run(self, arg):
        i = int(arg or 0)
        self.outputs[i].copy_(self.inputs[i] * 2 + i)
        self.runs[i] += 1


def test_each_request_runs_its_job_once_in_order():
    jobs = PyJobs(3)
    worker = handoff.Worker(spin_s=0.01)
    try:
        slots = [worker.add(jobs.fn, i) for i in range(3)]
        assert slots == [0, 1, 2]
        g = torch.Generator().manual_seed(0)
        order = [0, 1, 2, 2, 1, 0, 0, 0, 2] * 20  # the same job twice in a row too: its stale answer must not count
        for n, i in enumerate(order):
            jobs.inputs[i].copy_(torch.randn(64, generator=g))
            worker.request(slots[i])
            worker.wait(slots[i])
            assert torch.equal(jobs.outputs[i], jobs.inputs[i] * 2 + i), n
            assert sum(jobs.runs) == n + 1 and jobs.runs[i] == order[: n + 1].count(i)
        assert worker.counts() == {"runs": len(order), "unknown": 0, "naps": worker.counts()["naps"], "errors": 0}
        # a request for a slot that does not exist is answered anyway (a stream must never wait forever)
        worker.request(7)
        worker.wait(7)
        assert worker.counts()["unknown"] == 1 and sum(jobs.runs) == len(order)
    finally:
        worker.close()
    worker.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        worker.add(jobs.fn, 0)


def test_a_busy_worker_spins_between_requests():
    """While requests keep coming (decode's layers), the worker polls without napping: no request waits for a nap.
    (Its latency is the bench's business: ~2 us a round trip here with Python's loop, when the cores are free.)"""
    worker = handoff.Worker(spin_s=1.0)
    try:
        slot = worker.add(handoff.noop_function(), 0)
        word, want = worker.word, (slot + 1) | handoff.DONE
        naps = worker.counts()["naps"]
        for _ in range(5000):
            word[0] = slot + 1
            while word[0] != want:
                pass
        counts = worker.counts()
        assert counts["runs"] == 5000 and counts["naps"] == naps
    finally:
        worker.close()


def test_idle_worker_naps_answers_after_and_stops():
    jobs = PyJobs(1)
    worker = handoff.Worker(spin_s=0.002, nap_s=100e-6, deep_after_s=0.05, deep_nap_s=0.005)
    try:
        slot = worker.add(jobs.fn, 0)
        time.sleep(0.03)
        naps = worker.counts()["naps"]
        assert naps > 10, naps  # asleep between polls, not spinning
        time.sleep(0.1)
        deep = worker.counts()["naps"] - naps
        assert deep < 200, deep  # long naps once idle a while (naps of 100 us would be ~1000)
        for _ in range(3):  # a request while it naps: answered within a nap
            jobs.inputs[0].fill_(3.0)
            worker.request(slot)
            worker.wait(slot, timeout_s=2.0)
            assert torch.equal(jobs.outputs[0], torch.full((64,), 6.0))
            time.sleep(0.06)
    finally:
        t0 = time.perf_counter()
        worker.close()  # asleep in a deep nap: stops within one
    assert time.perf_counter() - t0 < 1.0


def test_stop_serves_a_pending_request_first():
    jobs = PyJobs(1)
    for _ in range(20):  # stop right after a request, idle, and right after start
        worker = handoff.Worker(spin_s=0.0, nap_s=1e-3)
        slot = worker.add(jobs.fn, 0)
        worker.request(slot)
        worker.close()
        assert worker.word[0] == (slot + 1) | handoff.DONE
    assert jobs.runs[0] == 20
    for _ in range(20):
        handoff.Worker().close()


@pytest.mark.skipif(not cpu_moe.available(), reason="the fused CPU kernel does not run on this CPU")
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_worker_runs_the_fused_kernels_job_bit_for_bit(x_dtype):
    """The worker runs the same job a host function runs, from a Block's views: the result equals job_run's."""
    e, h, inter, k, t = 6, 256, 320, 2, 3
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(e, inter, h, generator=g) * 0.05 for _ in range(2))
    down = torch.randn(e, h, inter, generator=g) * 0.05
    layer = cpu_moe.pack_layer(gate, up, down, "int4")
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.uint8)
    block = handoff.Block(t, k, h, x_dtype, torch.device("cpu"))
    assert not block.mapped_in and not block.mapped_out
    ref = (torch.zeros(t, h, dtype=x_dtype), torch.zeros(t, k, dtype=torch.int64), torch.zeros(t, k), torch.zeros(t, h))
    stats = [torch.zeros(8 + e + 2, dtype=torch.int64) for _ in range(2)]
    job = cpu_moe.job_new(layer, block.x, block.ids, block.w, mask, "silu", 2, block.y, stats[0], 1)
    want_job = cpu_moe.job_new(layer, *ref[:3], mask, "silu", 2, ref[3], stats[1], 1)
    worker = handoff.Worker()
    try:
        slot = worker.add(cpu_moe.job_function(), job)
        for step in range(50):
            x = torch.randn(t, h, generator=g).to(x_dtype)
            ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int()  # converted by put
            w = torch.rand(t, k, generator=g)
            block.put(x, ids, w)
            worker.request(slot)
            worker.wait(slot)
            got = block.fetch()
            for dst, src in zip(ref[:3], (x, ids, w), strict=True):
                dst.copy_(src)
            cpu_moe.job_run(want_job)
            assert torch.equal(got, ref[3]), step
        counted = [0, 1, 2, 3, 4, 6, 7, *range(8, 8 + e)]  # (not the times)
        assert torch.equal(stats[0][counted], stats[1][counted]) and int(stats[0][0]) == 50
    finally:
        worker.close()
        cpu_moe.job_free(job)
        cpu_moe.job_free(want_job)


def test_block_stages_in_one_piece():
    """Block on the CPU (copies, no mapping): x, ids, w land in the host views, converted; y comes back."""
    block = handoff.Block(2, 3, 40, torch.bfloat16, torch.device("cpu"))
    offsets = block.offsets
    assert offsets[0] == 0 and all(o % 64 == 0 for o in offsets) and offsets == sorted(offsets)
    x = torch.randn(2, 40).bfloat16()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32)
    w = torch.rand(2, 3).bfloat16()
    block.put(x, ids, w)
    assert torch.equal(block.x, x) and torch.equal(block.ids, ids.long()) and torch.equal(block.w, w.float())
    assert block.ids.dtype == torch.int64 and block.w.dtype == torch.float32
    block.y.copy_(torch.arange(80.0).view(2, 40))
    assert torch.equal(block.fetch(), torch.arange(80.0).view(2, 40))
    for view in (block.x, block.ids, block.w, block.y):
        assert view.untyped_storage().data_ptr() == block.host.data_ptr()  # one block


@pytest.mark.parametrize(
    ("src_dtype", "dst_dtype"),
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
        (torch.int32, torch.int64),
        (torch.int64, torch.int64),
    ],
)
def test_write_by_kernel_is_an_exact_copy(src_dtype, dst_dtype):
    """What the GPU writes through the block's mapping (kernels, not memcpy) is bit for bit what copy_ writes."""
    if src_dtype.is_floating_point:
        special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -3.5, 65504.0])
        src = torch.cat([special, torch.randn(500) * 100]).to(src_dtype)
    else:
        src = torch.randint(-(2**31), 2**31 - 1, (500,), dtype=torch.int64).to(src_dtype)
    dst, want = torch.empty(src.shape, dtype=dst_dtype), torch.empty(src.shape, dtype=dst_dtype)
    handoff.write_by_kernel(dst, src)
    want.copy_(src)
    assert torch.equal(dst.view(torch.uint8), want.view(torch.uint8))


def test_launch_choice():
    assert choose_launch(False, False, None)[0] == "inline"
    assert choose_launch(False, True, "x")[0] == "inline"
    assert choose_launch(True, False, None)[0] == "worker"
    launch, why = choose_launch(True, True, None)
    assert launch == "host_function" and "CADENZA_STREAM_CPU=host" in why
    launch, why = choose_launch(True, False, "no stream memory operations")
    assert launch == "host_function" and "no stream memory operations" in why
