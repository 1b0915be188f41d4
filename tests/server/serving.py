"""An in-process server for the request tests: the app over an EngineWorker, through Starlette's test client."""

from __future__ import annotations

from contextlib import contextmanager

from fastapi.testclient import TestClient

from cadenza.server.app import create_app
from cadenza.server.metrics import Metrics
from cadenza.server.protocol import Context
from cadenza.server.worker import EngineWorker


@contextmanager
def served_client(llm, max_queue: int, prefill_chunk: int | None = None):
    """A test client of `llm` served with a queue of `max_queue`; the worker is stopped on leaving."""
    metrics = Metrics("m", llm.max_batch, max_queue, "fp", "v", prefill_chunk)
    worker = EngineWorker(llm, max_queue=max_queue, metrics=metrics, prefill_chunk=prefill_chunk)
    worker.start()
    app = create_app(llm, worker, metrics, Context(llm, "m", max_queue), "fp", api_key=None)
    try:
        with TestClient(app) as c:
            yield c
    finally:
        worker.shutdown()
        worker.join(5)
