"""The FastAPI application: A1111's routes over a Service, the web page, and the guards in front.

In front of every route (outermost first): HTTP Basic auth when `--api-auth` is set; CORS only when
`--cors-allow-origins` is; a body guard that refuses bodies over MAX_BODY_BYTES (413, unread) and bodies
that stall (408 after BODY_TIMEOUT_S without a byte); JSON read whatever the Content-Type of a client
without an Origin (curl -d and urllib send form types; a browser's cross-site form always has an Origin).
Every error is one line: {"error": "<HTTP phrase>", "detail": "<what and why>"}.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import sys
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from . import controlnet, extras, models
from .catalog import memory
from .parse import BadRequestError, parse_request, png_info
from .service import Service

log = logging.getLogger("sd")
MAX_BODY_BYTES = 64 * 2**20
BODY_TIMEOUT_S = 30.0  # a sender that sends nothing for this long is cut off (408)
STATIC_DIR = Path(__file__).resolve().parent.parent / "webui" / "static"
DISCONNECT_POLL_S = 0.25
# A1111's routes that need what sd does not have: each answers 404 saying why, not a bare "no route"
NOT_SERVED = {
    "/sdapi/v1/interrogate": "it needs the CLIP or DeepBooru interrogator models",
    "/sdapi/v1/create/embedding": "textual inversion training is not part of sd (`sd train` trains the U-Net "
    "and the VAE)",
    "/sdapi/v1/create/hypernetwork": "hypernetworks are not supported",
    "/sdapi/v1/train/embedding": "textual inversion training is not part of sd",
    "/sdapi/v1/train/hypernetwork": "hypernetworks are not supported",
    "/sdapi/v1/unload-checkpoint": "the model stays loaded; `sd serve` runs one pipeline for its lifetime",
    "/sdapi/v1/reload-checkpoint": "the model stays loaded; switch with POST /sdapi/v1/options "
    "sd_model_checkpoint",
    "/sdapi/v1/server-kill": "stop the `sd serve` process instead",
    "/sdapi/v1/server-restart": "restart the `sd serve` process instead",
    "/sdapi/v1/server-stop": "stop the `sd serve` process instead",
}
MISSING_UI = """<!doctype html><html><head><meta charset="utf-8"><title>sd</title></head><body>
<h1>sd serve</h1><p>The web UI is not installed (no sd/webui/static/index.html).
The A1111-style API is at <a href="/docs">/docs</a>.</p></body></html>"""


def _error(status: int, detail: str, headers: dict[str, str] | None = None, request: Request | None = None):
    if request is not None:  # the one access line worth printing (successful polls would drown it)
        print(f"{request.method} {request.url.path}: {status} {detail}", file=sys.stderr)
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    return JSONResponse({"error": phrase, "detail": detail}, status_code=status, headers=headers)


async def _send_error(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """An error answer straight from an ASGI middleware (the app never saw the request)."""
    response = _error(status, detail, {**(headers or {}), "Connection": "close"})
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class _BodyError(HTTPException):
    pass


class BodyGuard:
    """413 for a body over `limit` bytes (by Content-Length before reading, or while reading), 408 for a
    sender that stalls, and JSON for clients that label it as a form (see the module docstring)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES, timeout: float = BODY_TIMEOUT_S):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_error(send, 400, "Content-Length is not a number")
            if int(length) > self.limit:
                return await _send_error(send, 413, f"request body over {self.limit // 2**20} MiB")
        if scope["method"] == "POST" and b"origin" not in headers:
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind in (b"", b"application/x-www-form-urlencoded", b"text/plain"):
                scope = dict(scope)
                others = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope["headers"] = [*others, (b"content-type", b"application/json")]
        received, done = 0, False

        async def guarded_receive():
            nonlocal received, done
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                raise _BodyError(408, f"no request body bytes for {self.timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyError(413, f"request body over {self.limit // 2**20} MiB")
                done = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                done = True
            return message

        await self.app(scope, guarded_receive, send)


class BasicAuth:
    """HTTP Basic auth for every path (A1111's --api-auth "user:pass[,user2:pass2]")."""

    def __init__(self, app, credentials: dict[str, str]):
        self.app, self.credentials = app, credentials

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._allowed(dict(scope["headers"]).get(b"authorization", b"")):
            return await self.app(scope, receive, send)
        await _send_error(send, 401, "Incorrect username or password", {"WWW-Authenticate": "Basic"})

    def _allowed(self, header: bytes) -> bool:
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = self.credentials.get(user)
        # compare_digest on every user: the time taken does not say which part was wrong
        return expected is not None and secrets.compare_digest(password.encode(), expected.encode())


def parse_api_auth(text: str) -> dict[str, str]:
    """ "user:pass,user2:pass2" -> {user: pass}; ValueError for an entry without a colon."""
    credentials = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        user, colon, password = entry.partition(":")
        if not colon or not user:
            raise ValueError(f"--api-auth takes user:password[,user2:password2], not {entry.split(':')[0]!r}")
        credentials[user] = password
    return credentials


def _validation_detail(error: RequestValidationError) -> str:
    """FastAPI's list of validation errors as one line, the first one named."""
    errors = error.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not JSON: {reason}".strip().rstrip(":")
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    value = first.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}, got {shown[:80]}{more}"


def make_app(service: Service, cors_origins: list[str] | None = None, cors_regex: str | None = None,
             auth: dict[str, str] | None = None, body_timeout: float = BODY_TIMEOUT_S,
             max_body: int = MAX_BODY_BYTES, static_dir: Path = STATIC_DIR) -> FastAPI:  # fmt: skip
    """The ASGI application over `service` (see the module docstring for the guards)."""
    app = FastAPI(title="sd", description="Stable Diffusion 1.x, served with AUTOMATIC1111's API",
                  version="1.10.1-sd", docs_url=None)  # fmt: skip
    _docs(app)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = error.detail
        if error.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; /docs lists them"
        elif error.status_code == 405:
            detail = f"{request.method} is not how {request.url.path} is used; /docs says how"
        return _error(error.status_code, str(detail), getattr(error, "headers", None), request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_detail(error), request=request)

    @app.exception_handler(BadRequestError)
    async def bad_request(request: Request, error: BadRequestError) -> JSONResponse:
        return _error(error.status, str(error), request=request)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return _error(500, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")

    # --- the web page ---------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = static_dir / "index.html"
        return FileResponse(page) if page.is_file() else HTMLResponse(MISSING_UI)

    app.mount("/static", StaticFiles(directory=static_dir, check_dir=False), name="static")
    try:  # the page's own routes (/sd/tokens, /sd/model): sd.webui, where it is installed
        from ..webui import router as webui_router
    except ImportError:
        webui_router = None
    if webui_router is not None:
        app.include_router(webui_router(lambda: service.pipe))

    # --- generation -----------------------------------------------------------------------------------

    async def generate(body: models._Processing, request: Request, img2img: bool) -> dict[str, Any]:
        sent = body.model_dump(exclude_unset=True)
        parsed = await run_in_threadpool(parse_request, sent, img2img, service.way, dict(service.options),
                                         service.controlnet_dir())  # fmt: skip
        job = service.submit(parsed, "img2img" if img2img else "txt2img")
        waiter = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
                if done:
                    # A1111 echoes the request, every field with its default, as `parameters`
                    return {**waiter.result(), "parameters": body.model_dump()}
                if await request.is_disconnected():  # nobody to answer: free the queue
                    service.queue.abandon(job)
                    raise HTTPException(499, "the client closed the connection")
        except asyncio.CancelledError:
            service.queue.abandon(job)
            raise

    @app.post("/sdapi/v1/txt2img", response_model=models.GenerationResponse, tags=["generation"])
    async def txt2img(body: models.Txt2ImgRequest, request: Request) -> dict[str, Any]:
        """A1111's txt2img: every A1111 field accepted; `info` lists the ones that did nothing."""
        return await generate(body, request, img2img=False)

    @app.post("/sdapi/v1/img2img", response_model=models.GenerationResponse, tags=["generation"])
    async def img2img(body: models.Img2ImgRequest, request: Request) -> dict[str, Any]:
        """A1111's img2img: init_images (one base64 image), denoising_strength, resize_mode 0 or 1."""
        answer = await generate(body, request, img2img=True)
        if not body.include_init_images:  # A1111 does not echo the input images back
            answer["parameters"].update(init_images=None, mask=None)
        return answer

    @app.get("/sdapi/v1/progress", response_model=models.ProgressResponse, tags=["progress"])
    async def progress(skip_current_image: bool = False, id_task: str | None = None) -> dict[str, Any]:
        """The running job (A1111's shape, `current_image`: a latent preview), and the queue behind it."""
        return await run_in_threadpool(service.progress, skip_current_image, id_task)

    @app.post("/internal/progress", tags=["progress"])
    async def internal_progress(body: models.InternalProgressRequest) -> dict[str, Any]:
        return await run_in_threadpool(
            service.internal_progress, body.id_task, body.id_live_preview, body.live_preview
        )

    @app.post("/sdapi/v1/interrupt", tags=["progress"])
    async def interrupt() -> None:
        """Stop the running job; it answers 200 with the images as far as they got."""
        service.interrupt()

    @app.post("/sdapi/v1/skip", tags=["progress"])
    async def skip() -> None:
        """End the running job's current batch (kept as it is) and go on with the next."""
        service.skip()

    @app.post("/sdapi/v1/png-info", response_model=models.PNGInfoResponse, tags=["images"])
    async def png_info_route(body: models.PNGInfoRequest) -> dict[str, Any]:
        return await run_in_threadpool(png_info, body.image)

    @app.post("/sdapi/v1/extra-single-image", response_model=models.ExtrasSingleImageResponse,
              tags=["images"])  # fmt: skip
    async def extra_single_image_route(body: models.ExtrasSingleImageRequest) -> dict[str, Any]:
        """A1111's Extras upscale of one image with a built-in upscaler (None, Lanczos, Nearest)."""
        return await run_in_threadpool(extras.extra_single_image, body.model_dump())

    @app.post("/sdapi/v1/extra-batch-images", response_model=models.ExtrasBatchImagesResponse,
              tags=["images"])  # fmt: skip
    async def extra_batch_images_route(body: models.ExtrasBatchImagesRequest) -> dict[str, Any]:
        return await run_in_threadpool(extras.extra_batch_images, body.model_dump())

    # --- options and listings -------------------------------------------------------------------------

    @app.get("/sdapi/v1/options", tags=["options"])
    async def get_options() -> dict[str, Any]:
        return service.get_options()

    @app.post("/sdapi/v1/options", tags=["options"])
    async def set_options(body: dict[str, Any]) -> None:
        """Set A1111 options: clip skip, emphasis, RNG, ENSD, eta, schedule settings take effect on the
        next jobs; sd_model_checkpoint and sd_vae switch between jobs (this answers once done)."""
        service.set_options(body)
        job = service.model_job(body)
        if job is not None:
            await asyncio.wrap_future(job.future)

    listings = {
        "/sdapi/v1/samplers": (service.samplers, list[models.SamplerItem]),
        "/sdapi/v1/schedulers": (service.schedulers, list[models.SchedulerItem]),
        "/sdapi/v1/sd-models": (service.sd_models, list[models.SDModelItem]),
        "/sdapi/v1/sd-vae": (service.sd_vae, list[models.SDVaeItem]),
        "/sdapi/v1/loras": (service.loras, list[models.LoraItem]),
        "/sdapi/v1/embeddings": (service.embeddings, models.EmbeddingsResponse),
        "/sdapi/v1/memory": (memory, models.MemoryResponse),
        "/sdapi/v1/cmd-flags": (service.cmd_flags, dict[str, Any]),
        "/sdapi/v1/upscalers": (service.upscalers, list[models.UpscalerItem]),
        "/sdapi/v1/latent-upscale-modes": (service.latent_upscale_modes, list[models.LatentUpscaleModeItem]),
        "/sdapi/v1/prompt-styles": (list, list[models.PromptStyleItem]),
        "/sdapi/v1/scripts": (lambda: {"txt2img": [], "img2img": []}, models.ScriptsList),
        "/sdapi/v1/script-info": (list, list[dict[str, Any]]),
        "/sdapi/v1/hypernetworks": (list, list[dict[str, Any]]),
        "/sdapi/v1/face-restorers": (list, list[dict[str, Any]]),
        "/sdapi/v1/realesrgan-models": (list, list[dict[str, Any]]),
        "/sdapi/v1/extensions": (list, list[dict[str, Any]]),
        "/sdapi/v1/sd-modules": (list, list[dict[str, Any]]),
    }  # fmt: skip
    # A1111's ControlNet extension's listings (its units: sd.server.controlnet)
    listings.update({
        "/controlnet/version": (lambda: {"version": 3}, dict[str, Any]),
        "/controlnet/model_list": (lambda: {"model_list": controlnet.model_list(service.controlnet_dir())},
                                   dict[str, Any]),
        "/controlnet/module_list": (lambda: {"module_list": ["none"], "module_detail": {"none": {
            "model_free": False, "sliders": []}}}, dict[str, Any]),
        "/controlnet/settings": (lambda: {"control_net_unit_count": 3}, dict[str, Any]),
    })  # fmt: skip
    for path, (function, shape) in listings.items():
        app.add_api_route(path, _listing(function), methods=["GET"], response_model=shape, tags=["listings"],
                          name=path.rsplit("/", 1)[1])  # fmt: skip
    for path in ("/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras", "/sdapi/v1/refresh-vae"):
        # Listings are read from disk on every call: there is nothing to refresh.
        app.add_api_route(path, _nothing, methods=["POST"], tags=["listings"], name=path.rsplit("/", 1)[1])

    @app.post("/sdapi/v1/refresh-embeddings", tags=["listings"])
    async def refresh_embeddings() -> None:
        """Read the embeddings folder again (between jobs; this answers once done)."""
        await asyncio.wrap_future(service.refresh_embeddings().future)

    for path, why in NOT_SERVED.items():
        app.add_api_route(path, _not_served(path, why), methods=["POST"], include_in_schema=False)

    guarded: Any = BodyGuard(app, limit=max_body, timeout=body_timeout)
    if cors_origins or cors_regex:
        from starlette.middleware.cors import CORSMiddleware

        guarded = CORSMiddleware(
            guarded, allow_origins=cors_origins or [], allow_origin_regex=cors_regex, allow_methods=["*"],
            allow_headers=["*"], allow_credentials=True,
        )  # fmt: skip
    if auth:
        guarded = BasicAuth(guarded, auth)
    app.state.service = service
    app.state.asgi = guarded  # what the server runs: the app behind its guards
    return app


def _not_served(path: str, why: str):
    async def route() -> None:
        raise StarletteHTTPException(404, f"{path} is A1111's, not served here: {why}")

    return route


def _listing(function):
    async def route() -> Any:
        return await run_in_threadpool(function)

    route.__doc__ = function.__doc__
    return route


async def _nothing() -> None:
    return None


def _docs(app: FastAPI) -> None:
    """/docs with Swagger UI's files from the swagger-ui-bundle package: FastAPI's default page loads them
    from a CDN, which a machine without the internet cannot reach (a blank page)."""
    from fastapi.openapi.docs import get_swagger_ui_html

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        swagger_ui_path = None
    urls: dict[str, str] = {}
    if swagger_ui_path is not None:
        app.mount("/docs-files", StaticFiles(directory=swagger_ui_path), name="docs-files")
        urls = {"swagger_js_url": "/docs-files/swagger-ui-bundle.js",
                "swagger_css_url": "/docs-files/swagger-ui.css",
                "swagger_favicon_url": "/docs-files/favicon-32x32.png"}  # fmt: skip

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="sd: API", **urls)
