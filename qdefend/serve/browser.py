"""Drive a headless Chromium over the DevTools protocol: open a page, evaluate JavaScript in it.

Used by the browser test and ``benchmarks/serving.py --browser`` to run the phone-browser page
for real (Debian's ``chromium``; no Selenium, no driver downloads). One page, one websocket to it
(``websocket-client``), ``Runtime.evaluate`` with ``awaitPromise`` for the page's async calls.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from qdefend.errors import QdefendError

__all__ = ["Chromium", "find_chromium"]

_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str:
    """The browser binary: $CHROMIUM, else Debian's (called directly: its wrapper prints /dev/shm noise)."""
    for c in ([os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else []) + list(_CANDIDATES):
        path = c if os.path.isabs(c) else shutil.which(c)
        if path and os.access(path, os.X_OK):
            return path
    raise QdefendError("no Chromium found: install it (Debian: apt-get install chromium) or set CHROMIUM=/path")


class Chromium:
    """A headless Chromium with one page; use as a context manager."""

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="qdefend-chromium-")
        args = [find_chromium(), "--headless", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}", "about:blank"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.console: list[str] = []
        self._id = 0
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        import websocket

        port_file = Path(self.profile) / "DevToolsActivePort"
        t0 = time.monotonic()
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None:
                raise QdefendError(f"Chromium exited with {self.proc.returncode} before it listened")
            if time.monotonic() - t0 > self.timeout:
                raise QdefendError(f"Chromium did not open its DevTools port in {self.timeout:g} s")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=self.timeout,
                                              suppress_origin=True)
        self.send("Runtime.enable")
        self.send("Page.enable")

    def send(self, method: str, params: dict | None = None, timeout: float | None = None) -> dict:
        self._id += 1
        self.ws.settimeout(timeout or self.timeout)
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params or {}}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in msg["params"]["args"]))
            elif msg.get("method") == "Runtime.exceptionThrown":
                d = msg["params"]["exceptionDetails"]
                self.console.append(f"uncaught: {d.get('exception', {}).get('description', d.get('text'))}")
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise QdefendError(f"DevTools {method}: {msg['error'].get('message')}")
                return msg["result"]

    def goto(self, url: str, ready: str = "document.readyState === 'complete'") -> None:
        """Navigate and wait until the JS expression `ready` is true."""
        self.send("Page.navigate", {"url": url})
        t0 = time.monotonic()
        while not self.evaluate(ready, await_promise=False):
            if time.monotonic() - t0 > self.timeout:
                raise QdefendError(f"page {url} not ready in {self.timeout:g} s; console: {self.console[-5:]}")
            time.sleep(0.05)

    def evaluate(self, expression: str, await_promise: bool = True, timeout: float | None = None) -> Any:
        """The JSON value of `expression` (awaited if it is a promise); a JS exception is raised."""
        res = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": await_promise,
                                             "returnByValue": True}, timeout=timeout)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise QdefendError(f"JS error: {d.get('exception', {}).get('description', d.get('text'))}")
        return res["result"].get("value")

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
