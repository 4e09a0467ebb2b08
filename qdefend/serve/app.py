"""``qdefend serve``: the cloud head of an exported run as an ASGI service (FastAPI + uvicorn).

Endpoints (``Authorization: Bearer TOKEN`` on every ``/v1`` route unless ``--insecure-no-auth``)::

    POST /v1/infer               features message (qdefend.edge.wire) -> labels, classes, probabilities
    GET  /v1/manifest            what a client must run: encoders' sha256, normalisation, release, wire grid
    GET  /v1/encoder/{artifact}  an encoder file of the run (the phone-browser page loads it)
    GET  /v1/reference           reference images and their int8 features (release off), to check a client
    GET  /healthz                liveness + what is served (no auth)
    GET  /metrics                Prometheus text: requests, latency histograms, rejects; a zoo's goodput (no auth)
    GET  /                       the phone-browser page (static; its JS and wasm from the npm install)

Every refused request gets a 4xx JSON ``{"error": "<one line>"}``; nothing logs feature bytes.
With ``--zoo`` (:mod:`.zoo`) ``POST /v1/infer`` also reads the targets headers and the zoo's
selection policy picks the head; the answer never names it.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from qdefend import __version__
from qdefend.edge import wire
from qdefend.errors import QdefendError

from .page import ORT_FILES, PAGE_FILES, WEB_DIR, missing_runtime, web_runtime_dir
from .service import RequestError, ServeConfig, Service, open_service

__all__ = ["create_app", "serve", "app_from_env"]

log = logging.getLogger("qdefend.serve")
_ENV = "QDEFEND_SERVE_CONFIG"
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _Metrics:
    """Prometheus counters and histograms; multi-process when uvicorn runs several workers."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("qdefend_requests_total", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("qdefend_request_latency_seconds", "request latency by route", ["route"],
                                 buckets=_BUCKETS, registry=self.registry)
        self.rejects = Counter("qdefend_rejects_total", "refused requests by reason", ["reason"],
                               registry=self.registry)
        self.samples = Counter("qdefend_inferred_samples_total", "feature samples answered", registry=self.registry)
        self.zoo_outcomes = self.goodput = None

    def add_zoo(self, goodput) -> None:
        """A zoo's goodput: requests with targets by outcome, and good / all of them (one process)."""
        from prometheus_client import Counter, Gauge

        self.zoo_outcomes = Counter("qdefend_zoo_requests_total", "zoo requests with targets by outcome "
                                    "(good, missed_latency, missed_accuracy, refused)", ["outcome"],
                                    registry=self.registry)
        for o in goodput.OUTCOMES:
            self.zoo_outcomes.labels(o)
        self.goodput = Gauge("qdefend_zoo_goodput_ratio", "share of zoo requests with targets answered within "
                             "their latency target by a model meeting their accuracy target", registry=self.registry)
        self.goodput.set_function(lambda: goodput.ratio)

    def text(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        if not self.multiprocess:
            return generate_latest(self.registry)
        reg = CollectorRegistry()
        MultiProcessCollector(reg)
        return generate_latest(reg)


def _error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def create_app(cfg: ServeConfig, service: Service | None = None) -> FastAPI:
    """The ASGI app for `cfg` (`service`: an already opened one, e.g. shared by tests)."""
    token = cfg.read_token()
    svc = service or open_service(cfg)
    zoo = getattr(svc, "policy", None) is not None
    limit = wire.max_body_bytes(svc.feature_shape, svc.max_batch)
    metrics = _Metrics()
    if zoo:
        metrics.add_zoo(svc.goodput)
    ort_dir = web_runtime_dir(cfg.web_runtime)
    app = FastAPI(title="qdefend serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.metrics = svc, metrics
    if cfg.allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        from .zoo import ACCURACY_HEADER, LATENCY_HEADER

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", ACCURACY_HEADER, LATENCY_HEADER])

    @app.middleware("http")
    async def _count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "other")
        metrics.requests.labels(name, str(response.status_code)).inc()
        metrics.latency.labels(name).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(RequestError)
    async def _refused(request: Request, e: RequestError):
        metrics.rejects.labels(e.kind).inc()
        log.info("refused %s %s: %d %s", request.method, request.url.path, e.status, e.reason)
        return _error(e.status, e.reason, {"WWW-Authenticate": "Bearer"} if e.status == 401 else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        metrics.rejects.labels("http").inc()
        hint = {404: f"no route {request.url.path}: see GET /v1/manifest and the README (Serving)",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return _error(e.status_code, hint)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        metrics.rejects.labels("invalid").inc()
        first = e.errors()[0] if e.errors() else {}
        return _error(422, f"invalid request: {first.get('msg', 'malformed')} at {'.'.join(map(str, first.get('loc', ())))}")

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(e).__name__}); the server log has the details")

    def authorize(request: Request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise RequestError(401, "missing bearer token: send the header 'Authorization: Bearer TOKEN'", "auth")
        if not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise RequestError(401, "wrong bearer token: use the one in the server's --token-file", "auth")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(400, f"Content-Length {declared!r} is not a number", "malformed")
            if int(declared) > limit:
                if int(declared) <= 16 * limit:  # read it away, so that the client sees the 413, not a reset
                    async for _ in request.stream():
                        pass
                raise RequestError(413, f"body of {int(declared)} bytes exceeds this server's limit of {limit} bytes "
                                        f"(--max-batch {svc.max_batch}): send fewer samples a request", "too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"body exceeds this server's limit of {limit} bytes: send fewer samples "
                                        "a request", "too_large")
        return bytes(body)

    def decode_and_infer(body: bytes, ctype: str, targets=None) -> dict[str, Any]:
        try:
            msg = wire.unpack(body) if ctype == wire.BINARY_TYPE else wire.loads_json(body)
        except wire.WireError as e:
            raise RequestError(400, f"malformed features message: {e}", "malformed") from None
        return svc.infer(msg) if targets is None else svc.infer(msg, targets)

    def zoo_targets(request: Request):
        from .zoo import ACCURACY_HEADER, LATENCY_HEADER, parse_targets

        try:
            return parse_targets(request.headers.get(ACCURACY_HEADER), request.headers.get(LATENCY_HEADER))
        except ValueError as e:
            raise RequestError(400, str(e), "targets") from None

    async def zoo_infer(request: Request, ctype: str) -> dict[str, Any]:
        t_arrival = time.perf_counter()
        targets = zoo_targets(request)
        body = await read_body(request)
        t0 = time.perf_counter()
        try:
            res = await run_in_threadpool(decode_and_infer, body, ctype, targets)
        except RequestError as e:
            outcome = svc.account(targets, None, 0.0) if e.kind == "zoo_accuracy" else None
            if outcome is not None:
                metrics.zoo_outcomes.labels(outcome).inc()
            raise
        member = res.pop("_member")
        now = time.perf_counter()
        outcome = svc.account(targets, member, (now - t_arrival) * 1e3)
        if outcome is not None:
            metrics.zoo_outcomes.labels(outcome).inc()
        metrics.samples.inc(len(res["labels"]))
        res["server_ms"] = round((now - t0) * 1e3, 3)
        return res

    @app.post("/v1/infer")
    async def infer(request: Request):
        authorize(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in (wire.BINARY_TYPE, wire.JSON_TYPE):
            raise RequestError(415, f"Content-Type {ctype or '(none)'!r} is not a features message: use "
                                    f"{wire.BINARY_TYPE} (binary) or {wire.JSON_TYPE}", "content_type")
        if zoo:
            return await zoo_infer(request, ctype)
        body = await read_body(request)
        t0 = time.perf_counter()
        res = await run_in_threadpool(decode_and_infer, body, ctype)
        metrics.samples.inc(len(res["labels"]))
        res["server_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        return res

    @app.get("/v1/manifest")
    async def manifest(request: Request):
        authorize(request)
        return svc.client_manifest()

    @app.get("/v1/reference")
    async def reference(request: Request):
        authorize(request)
        return await run_in_threadpool(svc.reference)

    @app.get("/v1/encoder/{name}")
    async def encoder(name: str, request: Request):
        authorize(request)
        path = svc.encoder_path(name)
        sha = svc.manifest["artifacts"][name]["sha256"]
        return FileResponse(path, media_type="application/octet-stream", headers={"X-Qdefend-Sha256": sha})

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "run": svc.manifest.get("run"), "head": svc.head_name, "version": __version__,
                "uptime_s": round(time.time() - svc.started, 1), "pid": os.getpid()}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def page():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in PAGE_FILES:
            raise RequestError(404, f"no static file {name!r}", "not_found")
        return FileResponse(WEB_DIR / name, media_type=PAGE_FILES[name])

    @app.get("/static/ort/{name}")
    async def ort(name: str):
        if name not in ORT_FILES:
            raise RequestError(404, f"no onnxruntime-web file {name!r}", "not_found")
        path = ort_dir / name
        if not path.is_file():
            raise RequestError(503, missing_runtime(path), "web_runtime")
        return FileResponse(path, media_type=ORT_FILES[name], headers={"Cache-Control": "max-age=3600"})

    return app


def app_from_env() -> FastAPI:
    """uvicorn's factory in each worker process (--workers N): the config travels as JSON in the env."""
    return create_app(ServeConfig(**json.loads(os.environ[_ENV])))


def _check_port(host: str, port: int) -> None:
    """A one-line error now, rather than uvicorn's log line and exit, for a busy or foreign address."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise QdefendError(f"--host {host}: cannot resolve it ({e.strerror}): pass an address such as 127.0.0.1") from None
    fam, _, _, _, addr = infos[0]
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise QdefendError(f"cannot listen on {host}:{port} ({e.strerror}): pass another --port, or stop "
                               "what is using it") from None


def _listen_socket(host: str, port: int):
    """The workers' shared listening socket, made with proto IPPROTO_TCP: asyncio sets TCP_NODELAY
    only on connections of such sockets, and uvicorn's own (proto 0) left every keep-alive answer
    waiting ~40 ms for a delayed ACK (Nagle), measured with 2 workers: 44 ms vs 1 ms a request."""
    import socket

    fam, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)[0]
    sock = socket.socket(fam, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.set_inheritable(True)
    return sock


def serve(cfg: ServeConfig, log_level: str = "info") -> None:
    """Open the run (errors surface here, once), then run uvicorn until SIGINT/SIGTERM (graceful)."""
    import uvicorn

    cfg.read_token()
    _check_port(cfg.host, cfg.port)
    service = open_service(cfg)  # fail fast
    if cfg.zoo:  # the operator's view of the zoo, once, on stderr
        import sys

        for m in service.describe()["members"]:
            print(f"zoo member {m['name']}: accuracy {m['accuracy']:.4f}, latency profile {m['latency_ms']:g} ms "
                  f"(measured {m['measured_ms']:.3f})", file=sys.stderr)
    ssl = {"ssl_certfile": cfg.ssl_certfile, "ssl_keyfile": cfg.ssl_keyfile} if cfg.ssl_certfile else {}
    common = dict(host=cfg.host, port=cfg.port, log_level=log_level, timeout_graceful_shutdown=30,
                  server_header=False, **ssl)
    if cfg.workers == 1:
        uvicorn.run(create_app(cfg, service), **common)
        return
    with tempfile.TemporaryDirectory(prefix="qdefend-metrics-") as tmp:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tmp)
        os.environ[_ENV] = json.dumps(asdict(cfg))
        from uvicorn.supervisors import Multiprocess

        config = uvicorn.Config("qdefend.serve.app:app_from_env", factory=True, workers=cfg.workers, **common)
        try:
            Multiprocess(config, sockets=[_listen_socket(cfg.host, cfg.port)]).run()
        except SystemExit as e:  # uvicorn exits 3 when a worker cannot start
            raise QdefendError(f"the server's workers did not start (exit {e.code}): see the log above") from None
