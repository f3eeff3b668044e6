"""``rge serve``: the OpenAI-compatible embeddings server (``rge.serving``) from the command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
from typing import Any

from .._about import DISTRIBUTION
from .errors import EXIT_MODEL, EXIT_OK, CLIError
from .options import add_model_options, dataclass_defaults, load_options, positive_float, positive_int


def add_serve_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    from ..serving.settings import DEFAULT_INPUT_WORKERS, ServerSettings

    default = dataclass_defaults(ServerSettings)
    serve = commands.add_parser("serve", parents=[common], help="serve embeddings over HTTP (OpenAI-compatible)")
    add_model_options(serve)
    serve.set_defaults(batch_size=default["batch_size"])
    serve.add_argument("--host", default="127.0.0.1", help="address to bind; 127.0.0.1 is this machine only")
    serve.add_argument("--port", type=positive_int, default=8000, help="port to bind")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $RGE_API_KEY if set)")
    serve.add_argument("--served-model-name", action="append", help="name(s) clients use (default: --model)")
    serve.add_argument("--query-model-suffix", default=default["query_model_suffix"],
                       help="each served name with this suffix is served too, for queries (for clients that cannot "
                       "send input_type); '' for none")  # fmt: skip
    serve.add_argument("--max-queued-items", type=positive_int, default=default["max_queued_items"],
                       help="items accepted and unfinished over all requests; beyond it: 429")  # fmt: skip
    serve.add_argument("--max-length", type=positive_int,
                       help="longest prompt in tokens, images and the query budget included (default: the model's "
                       "context)")  # fmt: skip
    serve.add_argument("--max-items-per-request", type=positive_int, default=default["max_items_per_request"],
                       help="inputs in one request")  # fmt: skip
    serve.add_argument("--max-body-bytes", type=positive_int, default=default["max_body_bytes"],
                       help="bytes of one request body")  # fmt: skip
    serve.add_argument("--max-image-pixels", type=positive_int, default=default["max_image_pixels"],
                       help="per decoded image")  # fmt: skip
    serve.add_argument("--max-request-pixels", type=positive_int, default=default["max_request_pixels"],
                       help="decoded pixels of all images of one request")  # fmt: skip
    serve.add_argument("--request-timeout", type=positive_float, default=default["request_timeout"],
                       help="seconds a request may take in all")  # fmt: skip
    serve.add_argument("--header-timeout", type=positive_float, default=default["header_timeout"],
                       help="seconds a connection may take to send its request headers")  # fmt: skip
    serve.add_argument("--body-timeout", type=positive_float, default=default["body_timeout"],
                       help="seconds a request body may take to arrive")  # fmt: skip
    serve.add_argument("--shutdown-timeout", type=positive_float, default=default["shutdown_timeout"],
                       help="on SIGTERM/Ctrl-C: seconds requests in flight have; then 503 and exit")  # fmt: skip
    serve.add_argument("--batch-wait-ms", type=float, default=default["batch_wait"] * 1000,
                       help="documents wait this long to share a batch")  # fmt: skip
    serve.add_argument("--input-workers", type=positive_int,
                       help="threads decoding and resizing request images (patches are made by the model's "
                       f"own input workers; default: {DEFAULT_INPUT_WORKERS}, or the cores this process may use if "
                       "fewer)")  # fmt: skip
    serve.add_argument("--torch-threads", type=positive_int,
                       help="CPU threads of the model (default: the cores left by --input-workers)")  # fmt: skip
    serve.add_argument("--allow-image-host", action="append", default=[],
                       help="fetch http(s) image URLs from this host ('.example.com': its subdomains too)")  # fmt: skip
    serve.add_argument("--allow-private-image-hosts", action="store_true",
                       help="allowed hosts may resolve to private or loopback addresses")  # fmt: skip
    serve.add_argument("--image-fetch-timeout", type=positive_float, default=default["image_fetch_timeout"],
                       help="seconds one image URL may take in all")  # fmt: skip
    for side in ("query", "document"):
        serve.add_argument(f"--{side}-prompt-name", help=f"task prompt before every {side} text that names none "
                           "(vqa, image_retrieval, ...: rge.prompts.TASK_PROMPTS)")  # fmt: skip
        serve.add_argument(f"--{side}-prompt", help=f"literal instruction before every {side} text that names none")
    serve.add_argument("--ray", action="store_true",
                       help=f"Ray Serve replicas (pip install '{DISTRIBUTION}[serve,ray]')")  # fmt: skip
    serve.add_argument("--replicas", type=positive_int, default=1, help="with --ray: engines, each its own model")
    serve.add_argument("--ray-address", help="with --ray: cluster to join (default: start a local one)")


def server_settings(args: argparse.Namespace) -> Any:
    from ..serving import ServerSettings

    if args.batch_wait_ms < 0:
        raise CLIError("--batch-wait-ms must be >= 0")
    try:
        return ServerSettings(
            model_names=tuple(args.served_model_name or [args.model]),
            query_model_suffix=args.query_model_suffix,
            api_key=args.api_key or os.environ.get("RGE_API_KEY") or None,
            batch_size=args.batch_size,
            batch_wait=args.batch_wait_ms / 1000,
            max_queued_items=args.max_queued_items,
            max_items_per_request=args.max_items_per_request,
            max_body_bytes=args.max_body_bytes,
            max_image_pixels=args.max_image_pixels,
            max_request_pixels=args.max_request_pixels,
            request_timeout=args.request_timeout,
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
            shutdown_timeout=args.shutdown_timeout,
            torch_threads=args.torch_threads,
            image_hosts=tuple(args.allow_image_host),
            private_image_hosts=args.allow_private_image_hosts,
            image_fetch_timeout=args.image_fetch_timeout,
            query_prompt_name=args.query_prompt_name,
            query_prompt=args.query_prompt,
            document_prompt_name=args.document_prompt_name,
            document_prompt=args.document_prompt,
            extra={"max_new_tokens": args.max_new_tokens},
            **({"input_workers": args.input_workers} if args.input_workers else {}),  # else the cores'
        )
    except ValueError as error:
        raise CLIError(str(error)) from None


def run_serve(args: argparse.Namespace) -> int:
    """Check everything, bind, then load the model in the background (``/health`` says when it is ready)."""
    from ..errors import require_extra

    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require_extra(module, extra="serve", needed_by="the server")
    options = {**load_options(args), "max_length": args.max_length}
    settings = server_settings(args)
    if args.ray:
        from ..serving.ray_serve import run_ray_serve  # before binding: it needs the ray extra

        _check_port(args.host, args.port)
        run_ray_serve(settings, args.model, options, replicas=args.replicas, host=args.host, port=args.port,
                      address=args.ray_address)  # fmt: skip
        return EXIT_OK
    _check_port(args.host, args.port)
    from ..serving import create_app
    from ..serving.server import make_server
    from .commands import load_encoder

    failure: list[BaseException] = []
    server: Any = None

    def stop(error: BaseException) -> None:
        failure.append(error)
        server.should_exit = True

    app = create_app(settings, lambda: load_encoder(args.model, options), on_load_error=stop)
    server = make_server(app, host=args.host, port=args.port)
    # SIGTERM (how process managers stop it) like Ctrl-C: uvicorn shuts down, then raises the signal again
    # under the handler it found, which here ends the command with status 0 rather than killing it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if failure:
        error = failure[0]
        if isinstance(error, CLIError):
            raise error
        raise CLIError(f"{args.model!r} failed to load: {' '.join(str(error).split())}", EXIT_MODEL)
    return EXIT_OK


def _check_port(host: str, port: int) -> None:
    """Refuse a taken port before the model is loaded."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise CLIError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
