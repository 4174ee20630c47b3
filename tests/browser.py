"""Debian's `chromium`, headless, driven over the DevTools protocol (a websocket, with aiohttp):
no browser download, no driver binary, no new dependency.

`Browser()` starts chromium on a throwaway profile and opens one page; its methods are
blocking (the protocol runs on an event loop in a background thread). Everything the page
does that a test must see goes into lists: `dialogs` (alert/confirm/prompt opened),
`errors` (uncaught exceptions, console errors, CSP violations; not HTTP error statuses),
`requests` (every URL the page asked for).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = (
    "chromium is not installed: `./run test` installs it (apt-get install -y chromium); "
    "the browser tests need it and never skip"
)


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(AssertionError):
    pass


class Browser:
    def __init__(self, executable: str, *, width: int = 1280, height: int = 900) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-"))
        self.proc = subprocess.Popen(
            [
                executable,
                "--headless=new",
                "--no-sandbox",  # CI runs as root, where chromium's sandbox refuses to start
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.dialogs: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.requests: list[str] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._loaded: asyncio.Event | None = None
        self._session = ""
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        try:
            url = self._devtools_url(timeout=30)
            self._run(self._connect(url))
            self.resize(width, height)
        except BaseException:
            self.close()
            raise

    # -- plumbing ------------------------------------------------------------------------------
    def _devtools_url(self, timeout: float) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                # keep draining stderr so chromium never blocks on a full pipe
                threading.Thread(target=self.proc.stderr.read, daemon=True).start()
                return m.group(1)
        raise BrowserError("chromium did not start:\n" + "".join(seen[-30:]))

    def _run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _connect(self, url: str) -> None:
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(url, max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        self._loaded = asyncio.Event()
        target = await self._send("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = await self._send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, False
        )
        self._session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            await self._send(f"{domain}.enable")

    async def _send(
        self, method: str, params: dict[str, Any] | None = None, session: bool = True
    ) -> dict[str, Any]:
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self._session
        fut: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self._pending[msg_id] = fut
        await self._ws.send_str(json.dumps(msg))
        reply = await fut
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def _read(self) -> None:
        async for frame in self._ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                continue
            msg = json.loads(frame.data)
            if "id" in msg:
                fut = self._pending.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            else:
                self._event(msg.get("method", ""), msg.get("params", {}))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BrowserError("chromium closed the DevTools connection"))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.loadEventFired" and self._loaded is not None:
            self._loaded.set()
        elif method == "Page.javascriptDialogOpening":
            self.dialogs.append(params)
            asyncio.ensure_future(self._send("Page.handleJavaScriptDialog", {"accept": False}))
        elif method == "Network.requestWillBeSent":
            self.requests.append(params.get("request", {}).get("url", ""))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append(str(details.get("exception", {}).get("description") or details))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a)) for a in params.get("args", [])))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            # a 4xx answer is the page's business (it shows the message); the rest is an error
            if entry.get("level") == "error" and entry.get("source") != "network":
                self.errors.append(str(entry.get("text")))

    # -- what tests call -----------------------------------------------------------------------
    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._run(self._send(method, params))

    def goto(self, url: str, timeout: float = 30) -> None:
        async def go() -> None:
            assert self._loaded is not None
            self._loaded.clear()
            result = await self._send("Page.navigate", {"url": url})
            if result.get("errorText"):
                raise BrowserError(f"cannot open {url}: {result['errorText']}")
            await asyncio.wait_for(self._loaded.wait(), timeout)

        self._run(go(), timeout + 5)

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20, what: str = "") -> Any:
        """Poll until `expression` is truthy in the page; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {what or expression}")
            time.sleep(0.05)

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element."""
        box = self.eval(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return null; e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        if box is None:
            raise BrowserError(f"no element {selector}")
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1},
            )

    def type(self, selector: str, text: str) -> None:
        """Focus the field, clear it, and type `text` as keyboard input."""
        found = self.eval(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return false; e.focus(); e.select(); return true; })()"
        )
        if not found:
            raise BrowserError(f"no element {selector}")
        self._key("Backspace", 8)
        self.send("Input.insertText", {"text": text})

    def press_enter(self) -> None:
        self._key("Enter", 13, "\r")

    def _key(self, key: str, code: int, text: str = "") -> None:
        for kind in ("keyDown", "keyUp"):
            params = {"type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code}
            if kind == "keyDown" and text:
                params["text"] = text
            self.send("Input.dispatchKeyEvent", params)

    def resize(self, width: int, height: int, *, mobile: bool = False) -> None:
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(data["data"]))

    def close(self) -> None:
        async def shut() -> None:
            if hasattr(self, "_ws"):
                with contextlib.suppress(Exception):  # it may close before it replies
                    await asyncio.wait_for(self._send("Browser.close", session=False), 5)
                await self._ws.close()
            if hasattr(self, "_http"):
                await self._http.close()

        with contextlib.suppress(Exception):
            self._run(shut(), 15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
