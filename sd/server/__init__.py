"""`sd serve`: one loaded model behind AUTOMATIC1111's HTTP API (FastAPI on uvicorn), and a web page.

URL layout:

    GET  /                        the web UI: sd/webui/static/index.html (a short page if it is missing)
    GET  /static/<path>           the UI's files, from sd/webui/static/<path>
    GET  /docs, /openapi.json     the API, every route and field (FastAPI's pages)
    POST /sdapi/v1/txt2img        A1111's fields and defaults: {"prompt": "a red fox", "steps": 20, ...}
    POST /sdapi/v1/img2img        ... plus init_images: ["<base64 PNG>"], denoising_strength, resize_mode
    GET  /sdapi/v1/progress       the running job (A1111's shape; current_image: a latent preview), and
                                  the queue: `queue`, and `queue_position` for ?id_task=<force_task_id>
    POST /internal/progress       A1111's page's poll: {"id_task": ..., "id_live_preview": n}
    POST /sdapi/v1/interrupt      stop the running job (it answers 200 with what it has); /skip: its batch
    GET|POST /sdapi/v1/options    A1111 options; clip skip, emphasis, RNG, ENSD, eta, ..., model and VAE
    GET  /sdapi/v1/samplers, /schedulers, /sd-models, /sd-vae, /loras, /embeddings, /upscalers,
         /latent-upscale-modes, /prompt-styles, /scripts, /memory, /cmd-flags
    POST /sdapi/v1/png-info, /refresh-checkpoints, /refresh-loras, /refresh-vae

One job runs at a time (one model in memory), the others wait their turn first come first served;
a client that goes away leaves the queue. Images are made A1111's way by default (a request's
`"way": "diffusers"` or `sd serve --way diffusers` picks ours); answers carry base64 PNGs with their
infotext and an `info` JSON string. Errors are one line: {"error": ..., "detail": ...}, status 4xx for the
request's fault. Modules: parse (fields -> parameters), models (pydantic shapes), jobs (the queue),
service (the glue to the Pipeline), catalog (listings), preview (latent -> RGB), app (routes, guards).
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from .app import MAX_BODY_BYTES, make_app, parse_api_auth
from .jobs import JobInterruptedError
from .parse import MAX_IMAGES, BadRequestError, parse_request, png_info
from .service import Service

DEFAULT_HOST = "127.0.0.1"  # this machine only: anyone who can reach the port can use the model
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 7860  # A1111's, so its clients find us without settings
BACKLOG = 2048  # pending connections the kernel keeps: a burst of clients waits instead of being reset


class Server:
    """uvicorn over a socket bound at construction (so a taken port fails before a model loads).

    The interface of the stdlib server it replaced: set `service`, call serve_forever() (blocks; in the
    main thread Ctrl-C ends it with KeyboardInterrupt), shutdown() from another thread, server_close()."""

    def __init__(self, service: Service | None, host: str, port: int, **app_options: Any):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
            self.socket.listen(BACKLOG)
        except OSError as error:
            self.socket.close()
            raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
        self.server_address = self.socket.getsockname()
        self.service = service
        self.app_options = app_options
        self.log_level = app_options.pop("log_level", "warning")
        self._uvicorn = None
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        import uvicorn

        if self.service is None:
            raise RuntimeError("Server.service must be set before serve_forever()")
        app = make_app(self.service, **self.app_options)
        config = uvicorn.Config(app.state.asgi, log_level=self.log_level, backlog=BACKLOG,
                                timeout_graceful_shutdown=3, lifespan="off",
                                access_log=False)  # fmt: skip
        self._uvicorn = uvicorn.Server(config)
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            self._stopped.wait(30)

    def server_close(self) -> None:
        self.socket.close()
        if self.service is not None:
            self.service.close()


def make_server(service: Service | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                **app_options: Any) -> Server:  # fmt: skip
    """A Server bound to host:port (port 0: any free one). `app_options`: make_app's (cors_origins,
    auth, body_timeout, ...) and uvicorn's log_level."""
    return Server(service, host, port, **app_options)


__all__ = [
    "DEFAULT_HOST", "DEFAULT_PORT", "LOCAL_HOSTS", "MAX_BODY_BYTES", "MAX_IMAGES", "BadRequestError",
    "JobInterruptedError", "Server", "Service", "make_app", "make_server", "parse_api_auth", "parse_request",
    "png_info",
]  # fmt: skip
