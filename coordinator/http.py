"""The coordinator's HTTP side: `/api/status` (JSON) and `/healthz`. The dashboard,
the rest of the JSON API and `/metrics` build on this server.

Stdlib only: a threading HTTP server whose handlers ask the coordinator's event loop
for data (the SQLite store is only touched from that loop)."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from starling.coordination import status_json

if TYPE_CHECKING:
    from .service import Coordinator

REQUEST_TIMEOUT_S = 10.0


class StatusHttpServer:
    def __init__(self, coordinator: Coordinator, host: str, port: int) -> None:
        self.coordinator = coordinator
        self.loop = asyncio.get_running_loop()
        handler = _handler_for(self)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def status(self) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            return status_json(self.coordinator.status())

        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(REQUEST_TIMEOUT_S)


def _handler_for(owner: StatusHttpServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            if self.path == "/healthz":
                self._send(200, {"ok": True})
            elif self.path == "/api/status":
                self._send(200, owner.status())
            else:
                self._send(404, {"error": f"no such page {self.path}"})

        def _send(self, code: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # quiet: the coordinator logs what matters

    return Handler
