"""`cadenza serve`: the OpenAI-compatible HTTP server (cadenza.server) on a model loaded from the engine flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from cadenza.cli.flags import add_command, add_engine_args, load
from cadenza.errors import CadenzaError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "serve",
        help="an OpenAI-compatible HTTP server (needs the serve extra)",
        description="Loads a model and serves it over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions, "
        "/v1/models; streaming included), batching concurrent requests. Needs the serve extra: pip install "
        "'cadenza[serve]'.",
        examples=[
            "cadenza serve -m Qwen/Qwen3-30B-A3B --gpu-memory 24GiB --max-batch 4 --port 8000",
            "curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
            """-d '{"model": "Qwen/Qwen3-30B-A3B", "messages": [{"role": "user", "content": "Hi"}]}'""",
        ],
    )
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--api-key", default=None,
        help="require 'Authorization: Bearer KEY' on /v1/ requests (default: $CADENZA_API_KEY, else none)",
    )  # fmt: skip
    p.add_argument(
        "--max-queue", type=int, default=64,
        help="sequences that may wait for a slot; beyond, requests get 429 (default 64)",
    )  # fmt: skip
    p.add_argument(
        "--prefill-chunk", type=int, default=512, metavar="TOKENS",
        help="prompt tokens prefilled per step between the running sequences' tokens: a long prompt delays other "
        "streams by one chunk at a time, not its whole prefill (default 512; 0: each prompt whole)",
    )  # fmt: skip
    p.add_argument(
        "--served-model-name", default=None,
        help="the model's name in the API (default: the Hugging Face id, else the checkpoint folder's name)",
    )  # fmt: skip
    p.add_argument(
        "--adapt-bytes", default="1GiB",
        help="adaptive placement: resident experts exchanged for ones live traffic uses more, at most this many "
        "bytes of copies at a time, between requests (default 1GiB)",
    )  # fmt: skip
    p.add_argument("--no-adaptive-placement", action="store_true", help="keep the placement fixed")
    p.add_argument(
        "--max-request-bytes", default="4MiB",
        help="largest request body accepted; larger ones get 413 (default 4MiB)",
    )  # fmt: skip
    p.add_argument(
        "--allowed-origins", default=None,
        help="web origins whose pages may call the server (CORS), comma-separated, e.g. "
        "https://app.example.com, or * for any (default: none)",
    )  # fmt: skip
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
        help="logging level; one line a request at info (default info)",
    )  # fmt: skip
    p.add_argument(
        "--log-format", default="text", choices=["text", "json"],
        help="the server's log lines as text or as JSON lines (default text)",
    )  # fmt: skip
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import os

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise CadenzaError(
            f"`cadenza serve` needs FastAPI and uvicorn, which are not installed ({e}). Install them with: "
            "pip install 'cadenza[serve]'  (or: pip install fastapi uvicorn)"
        ) from None
    if args.max_queue < 1:
        raise CadenzaError(f"--max-queue {args.max_queue} is not valid. Use a whole number of at least 1.")
    if args.prefill_chunk < 0:
        raise CadenzaError(
            f"--prefill-chunk {args.prefill_chunk} is not valid. Use a number of prompt tokens (default 512), or 0 "
            "to prefill each prompt whole."
        )
    api_key = args.api_key if args.api_key is not None else os.environ.get("CADENZA_API_KEY") or None
    from cadenza.moe.placement import parse_size
    from cadenza.server.serve import bind, serve

    if not args.no_adaptive_placement:
        parse_size(args.adapt_bytes, "--adapt-bytes")  # refuse a bad size before loading
    max_request_bytes = parse_size(args.max_request_bytes, "--max-request-bytes")
    if max_request_bytes < 1:
        raise CadenzaError("--max-request-bytes 0 would refuse every request. Give a size such as 4MiB.")
    origins = [o.strip() for o in (args.allowed_origins or "").split(",") if o.strip()] or None

    sock = bind(args.host, args.port)  # before loading: a taken port fails at once
    try:
        llm = load(args)
        hub_id = getattr(llm.checkpoint, "hub_id", None)
        name = args.served_model_name or (hub_id.repo_id if hub_id else Path(llm.checkpoint.path).name)
        adapt = None if args.no_adaptive_placement else parse_size(args.adapt_bytes)
        return serve(
            llm, sock, name, api_key, args.max_queue, args.log_level, adapt, max_request_bytes, origins,
            args.log_format, args.prefill_chunk or None,
        )  # fmt: skip
    finally:
        sock.close()
