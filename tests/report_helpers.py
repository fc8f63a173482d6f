"""Helpers for the report tests: a headless Chromium whose every request goes to a socket the test listens on.

The page is loaded from a ``file://`` URL with the proxy pointed at that
socket for every host, loopback included, so any request the page made (an
image, a font, a stylesheet, a script) arrives there and is recorded.
Chromium's own background calls to Google's service hosts (component
updates, account checks) arrive too; they are not the page's, so ``page_requests``
leaves them out, and a positive control (a page with an external image)
shows that a request by the page is seen.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from threat_helpers import cli_inproc

from airpack.report_html import find_browser, run_browser

TARGET = '\n[[targets]]\ngpu = "L4"\ncount = 1\ncontext = 1024\nruntime = "vllm"\n'  # a spec's target the tiny model fits
CHROMIUM_OWN = ("google.com", "googleapis.com", "gstatic.com", "gvt1.com", "googleusercontent.com")


@dataclass
class Listener:
    """A TCP socket that records the first bytes of every connection (the proxied request line)."""

    sock: socket.socket
    seen: list[bytes] = field(default_factory=list)

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()
        return f"{host}:{port}"

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                self.seen.append(conn.recv(512))
            except OSError:
                self.seen.append(b"")
            finally:
                conn.close()

    def page_requests(self) -> list[str]:
        """The request lines that are not Chromium's own calls home."""
        out = []
        for raw in self.seen:
            line = raw.split(b"\r\n", 1)[0].decode("latin-1")
            target = line.split(" ")[1] if " " in line else line
            host = target.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
            if not any(host == h or host.endswith("." + h) for h in CHROMIUM_OWN):
                out.append(line)
        return out


@dataclass
class Browser:
    """Headless Chromium through ``airpack.report_html.run_browser``, proxied to ``listener``."""

    exe: str
    listener: Listener

    def dom(self, page: Path, screenshot: Path | None = None) -> str:
        """The DOM after load (``--dump-dom``), and in the same run a 1280-wide screenshot when ``screenshot`` is given."""
        shot = [f"--screenshot={screenshot}", "--window-size=1280,2000", "--hide-scrollbars"] if screenshot is not None else []
        r = run_browser(["--dump-dom", *shot, page.resolve().as_uri()], browser=self.exe, proxy=self.listener.address, timeout=90)
        assert r.returncode == 0, r.stderr.decode("utf-8", "replace")[-2000:]
        if screenshot is not None:
            assert screenshot.is_file() and screenshot.stat().st_size > 0, r.stderr.decode("utf-8", "replace")[-2000:]
        return r.stdout.decode("utf-8")


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Headless Chromium proxied to a socket the test holds (conftest imports it); skips cleanly when none is installed."""
    exe = find_browser()
    if exe is None:
        pytest.skip("no Chromium installed (make test installs the Debian package chromium when run as root)")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(32)
    listener = Listener(sock)
    t = threading.Thread(target=listener.serve, daemon=True)
    t.start()
    try:
        yield Browser(exe=exe, listener=listener)
    finally:
        sock.close()
        t.join(timeout=5)


class _Refs(HTMLParser):
    """Every URL-carrying attribute of a document, and whether a script element or event handler appears."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts = 0
        self.handlers: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts += 1
        for k, v in attrs:
            if k in ("src", "href", "srcset", "action", "formaction", "poster", "data", "xlink:href", "background"):
                self.urls.append(v or "")
            if k.startswith("on"):
                self.handlers.append(k)


def outside_references(html: str) -> list[str]:
    """URLs in the document that point anywhere but a ``#`` fragment of itself or a ``data:`` URI."""
    p = _Refs()
    p.feed(html)
    return [u for u in p.urls if not (u.startswith("#") or u.startswith("data:"))]


def report_json(*args: str | Path) -> dict[str, Any]:
    """``airpack report ARGS --json`` in process, which must succeed: the facts document the HTML renders."""
    r = cli_inproc("report", *args, "--json")
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def page_text(dom: str) -> str:
    """The DOM's text, tags dropped and whitespace folded (what a reader sees, in order)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def script_count(html: str) -> tuple[int, list[str]]:
    p = _Refs()
    p.feed(html)
    return p.scripts, p.handlers
