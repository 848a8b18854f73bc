"""A minimal W3C WebDriver client (urllib only) for Debian's chromium + chromedriver."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    def __init__(self, width: int = 1280, height: int = 900):
        self.port = free_port()
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                self._call("GET", "/status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": CHROMIUM, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                         "--autoplay-policy=no-user-gesture-required",
                                         f"--window-size={width},{height}"]}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["value"]

    def _s(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self._s("POST", "/url", {"url": url})

    def run(self, script: str, *args):
        return self._s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def run_async(self, script: str, *args):
        return self._s("POST", "/execute/async", {"script": script, "args": list(args)})

    def click(self, css: str) -> None:
        """A click as the page sees one (the DOM's click(): handlers run, not a synthetic call)."""
        if not self.run("const e = document.querySelector(arguments[0]); if (e) e.click(); return !!e;", css):
            raise AssertionError(f"no element {css} to click")

    def type(self, css: str, text: str) -> None:
        """Set an input's value and fire its input and change events."""
        if not self.run("const e = document.querySelector(arguments[0]); if (!e) return false;"
                        "e.value = arguments[1]; e.dispatchEvent(new Event('input'));"
                        "e.dispatchEvent(new Event('change')); return true;", css, text):
            raise AssertionError(f"no element {css} to type into")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._s("GET", "/screenshot")))

    def close(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)
