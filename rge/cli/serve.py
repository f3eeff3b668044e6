"""``rge serve``: the OpenAI-compatible embeddings server (``rge.serving``) from the command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from typing import Any

from .._about import DISTRIBUTION
from .errors import EXIT_MODEL, EXIT_OK, CLIError
from .options import add_model_options, load_options, positive_float, positive_int


def add_serve_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    serve = commands.add_parser("serve", parents=[common], help="serve embeddings over HTTP (OpenAI-compatible)")
    add_model_options(serve)
    serve.set_defaults(batch_size=32)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=positive_int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $RGE_API_KEY if set)")
    serve.add_argument("--served-model-name", action="append", help="name(s) clients use (default: --model)")
    serve.add_argument("--max-queued-items", type=positive_int, default=1024, help="beyond it: 429 (default 1024)")
    serve.add_argument("--max-length", type=positive_int,
                       help="longest prompt in tokens (images, query budget included)")  # fmt: skip
    serve.add_argument("--max-items-per-request", type=positive_int, default=256)
    serve.add_argument("--max-body-bytes", type=positive_int, default=32 * 2**20)
    serve.add_argument("--max-image-pixels", type=positive_int, default=6000 * 6000, help="per decoded image")
    serve.add_argument("--request-timeout", type=positive_float, default=300.0, help="seconds (default 300)")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0, help="documents wait this long to share a batch")
    serve.add_argument("--allow-image-host", action="append", default=[],
                       help="fetch http(s) image URLs from this host ('.example.com': its subdomains too)")  # fmt: skip
    serve.add_argument("--allow-private-image-hosts", action="store_true",
                       help="allowed hosts may resolve to private or loopback addresses")  # fmt: skip
    serve.add_argument("--ray", action="store_true",
                       help=f"Ray Serve replicas (pip install '{DISTRIBUTION}[serve,ray]')")  # fmt: skip
    serve.add_argument("--replicas", type=positive_int, default=1, help="with --ray: engines, each its own model")
    serve.add_argument("--ray-address", help="with --ray: cluster to join (default: start a local one)")


def server_settings(args: argparse.Namespace) -> Any:
    from ..serving import ServerSettings

    if args.batch_wait_ms < 0:
        raise CLIError("--batch-wait-ms must be >= 0")
    return ServerSettings(
        model_names=tuple(args.served_model_name or [args.model]),
        api_key=args.api_key or os.environ.get("RGE_API_KEY") or None,
        batch_size=args.batch_size,
        batch_wait=args.batch_wait_ms / 1000,
        max_queued_items=args.max_queued_items,
        max_items_per_request=args.max_items_per_request,
        max_body_bytes=args.max_body_bytes,
        max_image_pixels=args.max_image_pixels,
        request_timeout=args.request_timeout,
        image_hosts=tuple(args.allow_image_host),
        private_image_hosts=args.allow_private_image_hosts,
        extra={"max_new_tokens": args.max_new_tokens},
    )


def run_serve(args: argparse.Namespace) -> int:
    """Check everything, bind, then load the model in the background (``/health`` says when it is ready)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise CLIError(f"rge serve needs the serve extra: pip install '{DISTRIBUTION}[serve]'") from None
    options = {**load_options(args), "max_length": args.max_length}
    settings = server_settings(args)
    if args.ray:
        _check_port(args.host, args.port)
        from ..serving.ray_serve import run_ray_serve

        run_ray_serve(settings, args.model, options, replicas=args.replicas, host=args.host, port=args.port,
                      address=args.ray_address)  # fmt: skip
        return EXIT_OK
    _check_port(args.host, args.port)
    from ..serving import create_app
    from .commands import load_encoder

    failure: list[BaseException] = []
    server: Any = None

    def stop(error: BaseException) -> None:
        failure.append(error)
        server.should_exit = True

    app = create_app(settings, lambda: load_encoder(args.model, options), on_load_error=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info", lifespan="on"))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a server is stopped: after a clean shutdown
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
