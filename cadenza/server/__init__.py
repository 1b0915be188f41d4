"""`cadenza serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the `serve` extra).

errors.py    the OpenAI-shaped error; pydantic's validation errors as one
schemas.py   the request bodies as pydantic models: fields honoured, ignored and refused
protocol.py  validated requests -> prompt ids and one SamplingParams per sequence
worker.py    the engine thread: one Batch, continuous batching, tokens handed to the asyncio loop
responses.py response bodies, stream chunks, log-probabilities
metrics.py   GET /metrics in Prometheus' text format
app.py       routes, API key, request counting
serve.py     socket, startup, SIGTERM
"""
