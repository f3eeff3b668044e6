"""Replicas with Ray Serve: the same app in each replica, each replica with its own model and engine loop.

``rge serve --ray --replicas N`` runs it; ``rge_deployment`` gives the application to ``serve.run`` for
a cluster of your own (GPUs per replica through ``ray_actor_options={"num_gpus": 1}``). Ray's proxy
spreads requests over replicas; each replica's queries share that replica's running batch, and
``/metrics`` answers for the replica that took the request. Importing this module without Ray Serve raises
``RGEMissingExtraError`` with the ``pip install`` command.
"""

from __future__ import annotations

from typing import Any

from ..errors import require_extra
from .settings import ServerSettings

require_extra("ray.serve", extra="ray", needed_by="serving with Ray Serve")


def rge_deployment(
    settings: ServerSettings,
    model: str,
    load_kwargs: dict[str, Any] | None = None,
    *,
    replicas: int = 1,
    ray_actor_options: dict[str, Any] | None = None,
) -> Any:
    """A Ray Serve application of ``replicas`` copies of the rge app serving ``model``."""
    from ray import serve

    from .app import create_app

    class RGEReplica:
        def __init__(self, settings: ServerSettings, model: str, load_kwargs: dict[str, Any]) -> None:
            self.settings, self.model, self.load_kwargs = settings, model, load_kwargs

        def __serve_build_asgi_app__(self) -> Any:
            from ..encoder import RGEEncoder

            return create_app(self.settings, lambda: RGEEncoder.from_pretrained(self.model, **self.load_kwargs))

    options = ray_actor_options or {"num_cpus": 1}
    deployment = serve.deployment(name="rge", num_replicas=replicas, ray_actor_options=options)
    return deployment(serve.ingress()(RGEReplica)).bind(settings, model, dict(load_kwargs or {}))


def run_ray_serve(
    settings: ServerSettings,
    model: str,
    load_kwargs: dict[str, Any],
    *,
    replicas: int,
    host: str,
    port: int,
    address: str | None = None,
) -> None:
    """Start (or join) Ray, serve on ``host:port`` until Ctrl-C, then shut the application down."""
    import ray
    import torch
    from ray import serve

    on_gpu = str(load_kwargs.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    application = rge_deployment(settings, model, load_kwargs, replicas=replicas,
                                 ray_actor_options={"num_gpus": 1} if on_gpu else {"num_cpus": 1})  # fmt: skip
    try:
        serve.run(application, name="rge", route_prefix="/", blocking=True)
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
