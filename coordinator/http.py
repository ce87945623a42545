"""The coordinator's HTTP side: the dashboard page, its JSON API, `/metrics`, checkpoint
downloads and the admin actions (README.md, "Dashboard, JSON API and metrics").

Stdlib only: a threading HTTP server whose handlers ask the coordinator's event loop
for data (the SQLite store is only touched from that loop). Everything public is a
read-only GET (or HEAD); a POST changes the run and needs the admin token as a Bearer
header. Errors are JSON {"error": ...} with a precise code: 400 bad query or body, 401
no token, 403 wrong token, 404 unknown path or object, 405 wrong method, 413 body too
large, 503 the coordinator did not answer in time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import api
from .metrics import CoordinatorMetrics
from .rundir import checkpoint_dir

if TYPE_CHECKING:
    from .service import Coordinator

T = TypeVar("T")
log = logging.getLogger("starling.coordinator")

REQUEST_TIMEOUT_S = 10.0  # waiting for the event loop; past it: 503
IDLE_CONNECTION_S = 30.0  # a keep-alive connection with no request is closed after this
CACHE_S = 1.0  # identical GETs within this share one answer (many viewers, one loop call)
MAX_BODY_BYTES = 4096
DOWNLOAD_CHUNK_BYTES = 1 << 20
PEER_FILTERS = ("all", *api.PEER_STATES)

# The page may talk to this server only: no CDN, no other origin (it works offline).
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'"
)


class HttpError(Exception):
    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Route:
    name: str  # the endpoint label of starling_http_requests_total
    pattern: re.Pattern[str]
    method: str  # GET routes answer HEAD too
    params: tuple[str, ...] = ()  # the query parameters it accepts


def _route(name: str, path: str, method: str = "GET", params: tuple[str, ...] = ()) -> Route:
    return Route(name, re.compile(path + r"\Z"), method, params)


ROUTES = (
    _route("page", "/"),
    _route("healthz", "/healthz"),
    _route("status", "/api/status"),
    _route("peers", "/api/peers", params=("state", "limit")),
    _route("rounds", "/api/rounds", params=("limit",)),
    _route("loss", "/api/loss", params=("after",)),
    _route("checkpoints", "/api/checkpoints"),
    _route("metrics", "/metrics"),
    # Only stored rounds and these two names: nothing else under the run directory.
    _route("checkpoint_file", r"/checkpoints/(\d{1,9})/(state\.safetensors|checkpoint\.json)"),
    _route("ban", r"/api/admin/nodes/([0-9A-Za-z_-]{1,128})/ban", "POST"),
    _route("revoke", r"/api/admin/tokens/([0-9A-Za-z_-]{1,64})/revoke", "POST"),
)


class StatusHttpServer:
    """The dashboard's server. Build it on the coordinator's event loop (it reads the
    admin token's hash there), then start() it; its threads serve the requests."""

    def __init__(self, coordinator: Coordinator, host: str, port: int) -> None:
        self.coordinator = coordinator
        self.loop = asyncio.get_running_loop()
        self.admin_sha256 = coordinator.store.get_meta("admin_token_sha256") or ""
        self.page = resources.files(__package__).joinpath("dashboard.html").read_bytes()
        self.metrics = CoordinatorMetrics(lambda: self.on_loop(api.metrics))
        self._cache: dict[str, tuple[float, bytes]] = {}
        self._cache_lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, port), _handler_for(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        # Polls for shutdown every 0.1 s (not the default 0.5 s): a quick, clean stop.
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def on_loop(self, read: Callable[[Coordinator], T]) -> T:
        """`read(coordinator)` run on the coordinator's event loop; 503 when it does not
        answer in time (or is gone)."""

        async def call() -> T:
            return read(self.coordinator)

        coroutine: Coroutine[Any, Any, T] = call()
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        except RuntimeError:  # the loop is closed: the coordinator is stopping
            coroutine.close()
            raise HttpError(503, "the coordinator is stopping") from None
        try:
            return future.result(REQUEST_TIMEOUT_S)
        except TimeoutError:
            future.cancel()
            raise HttpError(503, "the coordinator did not answer in time") from None

    def cached_json(self, key: str, read: Callable[[Coordinator], Any]) -> bytes:
        now = time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] < CACHE_S:
                return hit[1]
        # NaN or infinity would be invalid JSON for a browser: refuse to produce it.
        body = json.dumps(self.on_loop(read), allow_nan=False, separators=(",", ":")).encode()
        with self._cache_lock:
            if len(self._cache) > 256:  # distinct queries: keep the cache small
                self._cache.clear()
            self._cache[key] = (now, body)
        return body

    def forget_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def admin_token_ok(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode()).hexdigest()
        return bool(self.admin_sha256) and hmac.compare_digest(digest, self.admin_sha256)


def _handler_for(owner: StatusHttpServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a polling page reuses its connection
        server_version = "starling-coordinator"
        sys_version = ""
        timeout = IDLE_CONNECTION_S

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's names)
            self._dispatch("GET")

        def do_HEAD(self) -> None:  # noqa: N802
            self._dispatch("HEAD")

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._dispatch("PUT")

        def do_PATCH(self) -> None:  # noqa: N802
            self._dispatch("PATCH")

        def do_DELETE(self) -> None:  # noqa: N802
            self._dispatch("DELETE")

        def do_OPTIONS(self) -> None:  # noqa: N802
            self._dispatch("OPTIONS")

        # --- routing ------------------------------------------------------------------

        def _dispatch(self, method: str) -> None:
            endpoint = "unknown"
            self.body_read = False  # one handler serves every request of a connection
            try:
                parts = urllib.parse.urlsplit(self.path)
                route, match = _find(parts.path)
                endpoint = route.name
                allowed = ("GET", "HEAD") if route.method == "GET" else (route.method,)
                if method not in allowed:
                    raise HttpError(
                        405,
                        f"{method} is not allowed on {parts.path} (use {route.method})",
                        {"Allow": ", ".join(allowed)},
                    )
                query = {} if route.name == "page" else _query(parts.query, route.params)
                code = self._serve(route, match, query, head=method == "HEAD")
            except HttpError as err:
                code = err.code
                self._drain_body()
                self._json(err.code, {"error": err.message}, method == "HEAD", err.headers)
            except ConnectionError:  # the client went away mid-answer (a download cut)
                self.close_connection = True
                return
            except Exception as err:  # a bug: log it, answer 500 and keep serving
                log.exception("dashboard request %s %s", method, self.path)
                code = 500
                self._json(500, {"error": f"internal error: {err!r}"}, method == "HEAD")
            owner.metrics.http_requests.labels(endpoint, str(code)).inc()

        def _serve(
            self, route: Route, match: re.Match[str], query: dict[str, str], head: bool
        ) -> int:
            name = route.name
            if name == "page":
                return self._send(
                    200,
                    owner.page,
                    "text/html; charset=utf-8",
                    head,
                    {"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"},
                )
            if name == "healthz":
                return self._json(200, {"ok": True}, head)
            if name == "metrics":
                body = generate_latest(owner.metrics.registry)
                return self._send(200, body, CONTENT_TYPE_LATEST, head)
            if name == "checkpoint_file":
                return self._checkpoint_file(int(match.group(1)), match.group(2), head)
            if name in ("ban", "revoke"):
                return self._admin(name, match.group(1))
            read = _reader(name, query)
            key = self.path
            return self._send(200, owner.cached_json(key, read), "application/json", head, _PUBLIC)

        def _checkpoint_file(self, round_: int, name: str, head: bool) -> int:
            def stored(c: Coordinator) -> tuple[str, str] | None:
                for ckpt in c.store.checkpoints():
                    if ckpt.round == round_:
                        return c.config.run.name, ckpt.sha256
                return None

            found = owner.on_loop(stored)
            if found is None:
                raise HttpError(404, f"no checkpoint of round {round_}")
            run_name, sha256 = found
            path = checkpoint_dir(owner.coordinator.run.path, round_) / name
            try:
                file = path.open("rb")  # open before it could be pruned: the fd stays valid
            except FileNotFoundError:
                raise HttpError(404, f"checkpoint {round_} was just pruned") from None
            with file:
                size = os.fstat(file.fileno()).st_size
                is_state = name == "state.safetensors"
                download = f"{_safe_name(run_name)}-checkpoint-{round_}" + (
                    ".safetensors" if is_state else ".json"
                )
                headers = {"Content-Disposition": f'attachment; filename="{download}"'}
                if is_state:
                    headers["ETag"] = f'"{sha256}"'  # the SHA-256 /api/checkpoints lists
                self.send_response(200)
                self._headers(
                    "application/octet-stream" if is_state else "application/json",
                    size,
                    {**headers, **_PUBLIC},
                )
                if not head:
                    while chunk := file.read(DOWNLOAD_CHUNK_BYTES):
                        self.wfile.write(chunk)
            return 200

        # --- admin --------------------------------------------------------------------

        def _admin(self, name: str, target: str) -> int:
            self._authorize()
            body = self._read_body()
            if name == "ban":
                reason = body.get("reason", "")
                if not isinstance(reason, str) or len(reason) > 500:
                    raise HttpError(400, "reason must be a string of at most 500 characters")
                recorded = owner.on_loop(lambda c: c.ban_node(target, reason))
                if recorded is None:
                    raise HttpError(404, f"no node {target}")
                answer: dict[str, Any] = {"node_id": target, "state": "banned", "reason": recorded}
            else:
                if not owner.on_loop(lambda c: c.revoke_join_token(target)):
                    raise HttpError(404, f"no join token {target}")
                answer = {"token_id": target, "revoked": True}
            owner.forget_cache()  # the next read shows the change
            return self._json(200, answer, head=False)

        def _authorize(self) -> None:
            header = self.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise HttpError(
                    401,
                    "this action needs the run's admin token: Authorization: Bearer TOKEN",
                    {"WWW-Authenticate": 'Bearer realm="starling-admin"'},
                )
            if not owner.admin_token_ok(token.strip()):
                raise HttpError(403, "wrong admin token")

        def _read_body(self) -> dict[str, Any]:
            length = self._content_length()
            raw = self.rfile.read(length) if length else b""
            self.body_read = True
            if not raw.strip():
                return {}
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, ValueError):
                raise HttpError(400, "the body must be a JSON object") from None
            if not isinstance(body, dict):
                raise HttpError(400, "the body must be a JSON object")
            return body

        def _content_length(self) -> int:
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                raise HttpError(400, "bad Content-Length") from None
            if length < 0:
                raise HttpError(400, "bad Content-Length")
            if length > MAX_BODY_BYTES:
                self.close_connection = True  # its body stays unread
                raise HttpError(413, f"the body is limited to {MAX_BODY_BYTES} bytes")
            return length

        def _drain_body(self) -> None:
            """Reads a refused request's body if it is small and still unread, so the
            next request on this keep-alive connection starts where it should; else
            closes the connection after the answer."""
            if self.body_read or self.close_connection:
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if 0 < length <= MAX_BODY_BYTES:
                self.rfile.read(length)
            elif length != 0:
                self.close_connection = True

        # --- responses ----------------------------------------------------------------

        def _json(
            self, code: int, body: Any, head: bool, headers: dict[str, str] | None = None
        ) -> int:
            payload = json.dumps(body, allow_nan=False).encode()
            return self._send(code, payload, "application/json", head, headers)

        def _send(
            self,
            code: int,
            payload: bytes,
            content_type: str,
            head: bool,
            headers: dict[str, str] | None = None,
        ) -> int:
            self.send_response(code)
            self._headers(content_type, len(payload), headers or {})
            if not head:
                self.wfile.write(payload)
            return code

        def _headers(self, content_type: str, length: int, headers: dict[str, str]) -> None:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(length))
            self.send_header("X-Content-Type-Options", "nosniff")
            headers.setdefault("Cache-Control", "no-store")
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # quiet: the coordinator logs what matters; /metrics counts requests

    return Handler


# Public, read-only data: other origins may read it (a run's page on another site).
_PUBLIC = {"Access-Control-Allow-Origin": "*"}


def _find(path: str) -> tuple[Route, re.Match[str]]:
    for route in ROUTES:
        match = route.pattern.match(path)
        if match is not None:
            return route, match
    raise HttpError(404, f"no such page {path}")


def _query(text: str, accepted: tuple[str, ...]) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True)
    except ValueError:
        raise HttpError(400, f"malformed query {text!r}") from None
    query: dict[str, str] = {}
    for key, value in pairs:
        if key not in accepted:
            known = ", ".join(accepted) or "none"
            raise HttpError(400, f"unknown query parameter {key!r} (accepted: {known})")
        if key in query:
            raise HttpError(400, f"query parameter {key!r} given twice")
        query[key] = value
    return query


def _int_param(query: dict[str, str], key: str, default: int, low: int, high: int) -> int:
    if key not in query:
        return default
    try:
        value = int(query[key])
    except ValueError:
        raise HttpError(400, f"{key} must be an integer, got {query[key]!r}") from None
    if not low <= value <= high:
        raise HttpError(400, f"{key} must be in {low}..{high}, got {value}")
    return value


def _reader(name: str, query: dict[str, str]) -> Callable[[Coordinator], Any]:
    """The api function behind a JSON route, its query parameters checked (400)."""
    if name == "status":
        return api.status
    if name == "peers":
        state = query.get("state", "all")
        if state not in PEER_FILTERS:
            raise HttpError(400, f"state must be one of {', '.join(PEER_FILTERS)}, got {state!r}")
        limit = _int_param(query, "limit", 200, 1, 1000)
        return lambda c: api.peers(c, state, limit)
    if name == "rounds":
        limit = _int_param(query, "limit", 20, 1, 200)
        return lambda c: api.rounds(c, limit)
    if name == "loss":
        after = _int_param(query, "after", -1, -1, 1 << 40)
        return lambda c: api.loss(c, after)
    if name == "checkpoints":
        return api.checkpoints
    raise AssertionError(f"no reader for {name}")


def _safe_name(name: str) -> str:
    """A run name fit for a download's file name (it is the admin's free text)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"
