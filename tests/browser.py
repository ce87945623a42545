"""Headless Chromium driven over the Chrome DevTools Protocol (CDP), for tests that load
a page as a person would: navigate, wait for a DOM condition with a deadline, read the
page, take screenshots, and see every script error and network request it made.

Chromium comes from Debian's packages (`apt-get install -y chromium`; the README's test
command installs it). Its DevTools websocket is spoken with `websocket-client`."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket

from .coordinator_support import wait_for


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise AssertionError(
            "headless Chromium is needed for the dashboard tests and is not installed: "
            "apt-get install -y chromium (the README's test command does this)"
        )
    return binary


class Browser:
    """One Chromium process with one page. Calls are synchronous: each CDP command waits
    for its answer; the events that arrive meanwhile are kept (see `errors`,
    `requests`)."""

    def __init__(self, profile: Path, log: Path) -> None:
        profile.mkdir(parents=True, exist_ok=True)
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [
                chromium_binary(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                # Nothing but the page under test: no update checks, sync, pings or
                # metrics uploads (this machine talks to loopback only).
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-domain-reliability",
                "--disable-sync",
                "--no-pings",
                "--metrics-recording-only",
                "--disable-default-apps",
                "--disable-extensions",
                "--hide-scrollbars",
                "--remote-debugging-port=0",  # Chromium picks one and writes it down
                f"--user-data-dir={profile}",
                "--window-size=1440,900",
                "about:blank",
            ],
            stdout=self._log,
            stderr=self._log,
        )
        port_file = profile / "DevToolsActivePort"
        wait_for(
            lambda: port_file.is_file() and len(port_file.read_text().splitlines()) >= 2,
            30,
            "Chromium's DevTools port",
        )
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.loads(r.read())
        page = next(t for t in targets if t["type"] == "page")
        # No Origin header: Chromium refuses DevTools websockets from other origins.
        self.socket = websocket.create_connection(
            page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True
        )
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{domain}.enable")

    # --- the protocol -------------------------------------------------------------------

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        call_id = self._next_id
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            if "method" in message:
                self.events.append(message)

    def _drain_events(self, seconds: float) -> None:
        """Reads the events that arrive within `seconds` (nothing is asked meanwhile)."""
        self.socket.settimeout(seconds)
        try:
            while True:
                self.events.append(json.loads(self.socket.recv()))
        except websocket.WebSocketTimeoutException:
            pass
        finally:
            self.socket.settimeout(30)

    # --- what tests use -----------------------------------------------------------------

    def open(self, url: str, timeout: float = 30.0) -> None:
        """Navigates and waits for the load event."""
        loads = len(self._events_named("Page.loadEventFired"))
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while len(self._events_named("Page.loadEventFired")) == loads:
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not load within {timeout} s")
            self._drain_events(0.2)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float, what: str) -> Any:
        """Polls a JavaScript expression until it is truthy; fails after `timeout`."""
        return wait_for(lambda: self.evaluate(expression), timeout, what)

    def viewport(self, width: int, height: int, scale: float = 1.0, mobile: bool = False) -> None:
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=scale,
            mobile=mobile,
        )

    def screenshot(self, path: Path) -> None:
        """The whole page (beyond the viewport), as PNG."""
        metrics = self.send("Page.getLayoutMetrics")
        size = metrics["cssContentSize"]
        shot = self.send(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def errors(self) -> list[str]:
        """Uncaught script exceptions, console errors and the browser's own error log
        (failed loads, Content-Security-Policy violations) so far."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
                found.append(json.dumps(params["args"])[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(json.dumps(params["entry"])[:500])
        return found

    def requests(self) -> list[str]:
        """URLs of every request the page made so far."""
        sent = self._events_named("Network.requestWillBeSent")
        return [event["params"]["request"]["url"] for event in sent]

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self._log.close()

    def _events_named(self, method: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("method") == method]
