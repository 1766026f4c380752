"""Open a page in headless Chromium and report what a person would see go wrong.

Drives Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``: fd 3 carries
commands to the browser, fd 4 its replies, each JSON message ended by a NUL byte), so it needs no
Python package beyond the standard library and opens no network port. Networking is switched off
as far as flags allow; a report page needs none.

    check = check_page("report/index.html", screenshot="report.png")
    check.console_errors   # console.error/assert calls, uncaught exceptions, failed loads
    check.images           # [{"src", "naturalWidth", "complete"}] of every <img>

Debian: ``apt-get install chromium``. ``QKPROBE_CHROMIUM`` names another binary.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import QKProbeError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
         "--no-default-browser-check", "--disable-dev-shm-usage")


class BrowserError(QKProbeError):
    """Chromium is missing or did not answer."""


def find_chromium() -> Optional[str]:
    """Path of a Chromium/Chrome binary (``QKPROBE_CHROMIUM`` first), or None."""
    env = os.environ.get("QKPROBE_CHROMIUM")
    if env:
        return env if os.path.isfile(env) else shutil.which(env)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageCheck:
    url: str
    title: str = ""
    console_errors: List[str] = field(default_factory=list)
    images: List[Dict[str, Any]] = field(default_factory=list)
    screenshot: Optional[str] = None
    size: Optional[Dict[str, float]] = None

    @property
    def broken_images(self) -> List[str]:
        return [str(i.get("src")) for i in self.images if not i.get("naturalWidth")]

    @property
    def ok(self) -> bool:
        return not self.console_errors and not self.broken_images


class _Pipe:
    """One DevTools connection over the browser's fds 3 and 4."""

    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int):
        self.proc, self.write_fd, self.read_fd = proc, write_fd, read_fd
        self.messages: "queue.Queue[Optional[dict]]" = queue.Queue()
        self.events: List[dict] = []
        self._next = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        try:
            while True:
                chunk = os.read(self.read_fd, 1 << 16)
                if not chunk:
                    break
                buf += chunk
                while b"\0" in buf:
                    raw, buf = buf.split(b"\0", 1)
                    try:
                        self.messages.put(json.loads(raw.decode("utf-8")))
                    except ValueError:
                        pass
        except OSError:
            pass
        self.messages.put(None)

    def call(self, method: str, params: Optional[dict] = None, session: Optional[str] = None,
             timeout: float = 30.0) -> dict:
        self._next += 1
        msg: Dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        try:
            os.write(self.write_fd, json.dumps(msg).encode("utf-8") + b"\0")
        except OSError:
            self.proc.poll()
            raise BrowserError(f"Chromium is not running (exit code {self.proc.returncode}); it could not be "
                               f"sent {method}.") from None
        deadline = time.monotonic() + timeout
        while True:
            reply = self._get(deadline, method)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise BrowserError(f"Chromium refused {method}: {reply['error'].get('message')}.")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if any(e.get("method") == method for e in self.events):
            return True
        while time.monotonic() < deadline:
            try:
                reply = self._get(deadline, method)
            except BrowserError:
                return False
            self.events.append(reply)
            if reply.get("method") == method:
                return True
        return False

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                msg = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if msg is None:
                return
            self.events.append(msg)

    def _get(self, deadline: float, what: str) -> dict:
        try:
            msg = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise BrowserError(f"Chromium did not answer {what} in time.") from None
        if msg is None:
            raise BrowserError(f"Chromium exited while waiting for {what} (exit code {self.proc.poll()}).")
        return msg


def _high_fd(fd: int) -> int:
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


def _errors(events: List[dict], session: str) -> List[str]:
    out = []
    for e in events:
        if e.get("sessionId") != session:
            continue
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            args = [str(a.get("value", a.get("description", ""))) for a in p.get("args", [])]
            out.append(f"console.{p.get('type')}: {' '.join(args)}")
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append(f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}")
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            entry = p["entry"]
            out.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
    return out


_IMAGES_JS = ("JSON.stringify(Array.from(document.images).map(i => ({src: i.getAttribute('src'), "
              "naturalWidth: i.naturalWidth, complete: i.complete})))")


def check_page(page, screenshot: Optional[str] = None, *, width: int = 1280, max_height: int = 16000,
               clip_height: Optional[int] = None, timeout: float = 60.0, settle: float = 0.5,
               chromium: Optional[str] = None) -> PageCheck:
    """Load ``page`` (a file path or a file:// or http://127.0.0.1 URL) in headless Chromium.

    Returns the console errors (``console.error``/``assert``, uncaught exceptions, resources that
    failed to load), every ``<img>``'s naturalWidth, and writes a PNG screenshot of the whole
    page (or its top ``clip_height`` CSS pixels) when ``screenshot`` is given.
    """
    with BrowserSession(page, width=width, timeout=timeout, chromium=chromium) as browser:
        browser.settle(settle)
        result = PageCheck(url=browser.url)
        result.images = json.loads(browser.evaluate(_IMAGES_JS) or "[]")
        result.title = str(browser.evaluate("document.title") or "")
        result.size = browser.content_size()
        if screenshot:
            browser.resize(int(min(max_height, clip_height or result.size["height"], result.size["height"])))
            result.screenshot = browser.screenshot(screenshot)
        result.console_errors = browser.console_errors()
    return result


class BrowserSession:
    """A page kept open in headless Chromium to interact with (tests of the report's viewer,
    screenshots of a hovered state)::

        with BrowserSession("report/index.html") as page:
            page.dispatch('.qkv [data-panel="query"] [data-token="5"]', "mouseover")
            page.evaluate("document.title")
            page.hover("#run0-viewer [data-token='7']")        # a real mouse move
            page.screenshot("viewer.png", selector="#run0-viewer")
            page.console_errors()
    """

    def __init__(self, page, *, width: int = 1280, height: int = 900, timeout: float = 60.0,
                 chromium: Optional[str] = None):
        binary = chromium or find_chromium()
        if not binary:
            raise BrowserError("No Chromium found; install it (Debian: apt-get install chromium) or set "
                               "QKPROBE_CHROMIUM to the browser binary.")
        self.url = str(page) if "://" in str(page) else Path(page).resolve().as_uri()
        self.width, self.height, self.timeout = width, height, timeout
        self._profile = tempfile.mkdtemp(prefix="qkprobe-chromium-")
        self._log = open(os.path.join(self._profile, "chromium-stderr.log"), "wb")
        self._proc = self._pipe = None
        self._fds: List[int] = []
        try:
            self._launch(binary)
            self._open()
        except BrowserError as exc:
            self._log.flush()
            tail = Path(self._log.name).read_text(errors="replace").strip().splitlines()[-3:]
            self.close()
            raise BrowserError(f"{exc} Chromium said: {' | '.join(tail) or 'nothing'}") from None
        except BaseException:
            self.close()
            raise

    def _launch(self, binary: str) -> None:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        to_r, to_w, from_r, from_w = (_high_fd(f) for f in (to_r, to_w, from_r, from_w))

        def child_fds():  # the child's fd 3 reads our commands, fd 4 answers (see check_page)
            os.dup2(to_r, 3)
            os.dup2(from_w, 4)

        args = [binary, *FLAGS, f"--window-size={self.width},{self.height}", f"--user-data-dir={self._profile}",
                "--remote-debugging-pipe", "about:blank"]
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
                                      preexec_fn=child_fds, close_fds=False)
        os.close(to_r)
        os.close(from_w)
        self._fds = [to_w, from_r]
        self._pipe = _Pipe(self._proc, to_w, from_r)

    def _open(self) -> None:
        pipe = self._pipe
        target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout=self.timeout)["targetId"]
        self.session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            pipe.call(f"{domain}.enable", session=self.session)
        self._viewport(self.height)
        pipe.events.clear()
        pipe.call("Page.navigate", {"url": self.url}, session=self.session, timeout=self.timeout)
        if not pipe.wait_event("Page.loadEventFired", self.timeout):
            raise BrowserError(f"{self.url} did not finish loading within {self.timeout:.0f} s.")
        pipe.drain(0.2)

    def settle(self, seconds: float) -> None:
        """Let the page run for ``seconds`` (timers, late loads), collecting its console events."""
        self._pipe.drain(seconds)

    def content_size(self) -> Dict[str, float]:
        """The page's full {width, height} in CSS pixels."""
        metrics = self._pipe.call("Page.getLayoutMetrics", session=self.session)
        size = metrics.get("cssContentSize") or metrics.get("contentSize") or {}
        return {"width": size.get("width", self.width), "height": size.get("height", self.height)}

    def resize(self, height: int) -> None:
        """Make the viewport ``height`` CSS pixels tall (a screenshot without a selector takes it all)."""
        self.height = max(1, int(height))
        self._viewport(self.height)
        self._pipe.drain(0.2)

    def _viewport(self, height: int) -> None:
        self._pipe.call("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": max(1, int(height)),
                                                               "deviceScaleFactor": 1, "mobile": False},
                        session=self.session)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serializable values)."""
        reply = self._pipe.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                     "awaitPromise": True}, session=self.session,
                                timeout=self.timeout)
        if "exceptionDetails" in reply:
            d = reply["exceptionDetails"]
            raise BrowserError(f"The page threw {d.get('exception', {}).get('description') or d.get('text')}.")
        return reply.get("result", {}).get("value")

    def dispatch(self, selector: str, event: str = "mouseover") -> None:
        """Dispatch a bubbling mouse event (``mouseover``, ``click``, ...) or, for ``change``, a
        plain event on the first element matching ``selector``."""
        js = (f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return false; "
              f"const ev = {json.dumps(event)} === 'change' ? new Event('change', {{bubbles: true}}) : "
              f"new MouseEvent({json.dumps(event)}, {{bubbles: true, cancelable: true, view: window}}); "
              f"e.dispatchEvent(ev); return true; }})()")
        if not self.evaluate(js):
            raise BrowserError(f"No element matches {selector} on {self.url}.")

    def rect(self, selector: str, scroll: bool = True) -> Dict[str, float]:
        """The page-coordinate box {x, y, width, height} (and viewport {vx, vy}) of the first element
        matching ``selector``, scrolled into view first when ``scroll``."""
        into_view = "e.scrollIntoView({block: 'center'}); " if scroll else ""
        js = (f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null; "
              f"{into_view}const r = e.getBoundingClientRect(); "
              f"return {{x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height, "
              f"vx: r.left, vy: r.top}}; }})()")
        box = self.evaluate(js)
        if not box:
            raise BrowserError(f"No element matches {selector} on {self.url}.")
        return box

    def hover(self, selector: str) -> None:
        """Move the mouse onto the centre of the first element matching ``selector``."""
        box = self.rect(selector)
        self._pipe.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": box["vx"] + box["width"] / 2,
                                                     "y": box["vy"] + box["height"] / 2}, session=self.session)
        self._pipe.drain(0.1)

    def screenshot(self, path, selector: Optional[str] = None, margin: int = 8) -> str:
        """PNG of the element matching ``selector`` (with ``margin`` pixels), else of the viewport."""
        clip = {"x": 0, "y": 0, "width": self.width, "height": self.height, "scale": 1}
        if selector:
            box = self.rect(selector, scroll=False)   # scrolling would move a hovered element off the mouse
            clip = {"x": max(0, box["x"] - margin), "y": max(0, box["y"] - margin),
                    "width": box["width"] + 2 * margin, "height": box["height"] + 2 * margin, "scale": 1}
        shot = self._pipe.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                          "clip": clip}, session=self.session, timeout=self.timeout)
        Path(path).write_bytes(base64.b64decode(shot["data"]))
        return str(path)

    def console_errors(self) -> List[str]:
        """Console errors, uncaught exceptions and failed loads so far."""
        self._pipe.drain(0.05)
        return _errors(self._pipe.events, self.session)

    def close(self) -> None:
        if self._pipe is not None and self._proc is not None and self._proc.poll() is None:
            try:
                self._pipe.call("Browser.close", timeout=5)
            except BrowserError:
                pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "BrowserSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
