"""A real static file server (nginx) on 127.0.0.1, standing in for the Hub's CDN in tests and the benchmark.

The built-in CDN of tests/hubserver.py is a Python thread: good for faults, too
slow and too polite to measure a downloader against. ``NginxCDN(root)`` serves
``root`` as it is, with byte ranges, sendfile and keep-alive, the way a CDN
origin does, so a benchmark measures the client and not the server.

Nothing outside a throwaway temp dir is touched: the config, pid file, logs and
nginx's temp paths all live there, nginx runs in the foreground as one process
(``daemon off; master_process off``) that this object starts and stops, and it
needs no root. ``secure_link_secret`` makes nginx check signed URLs the way the
test Hub signs them (``?Expires=<unix time>&Signature=<base64url MD5 of
"<expires><uri> <secret>">``, nginx's secure_link module) and answer an
expired or forged one with the CDN's 403 AccessDenied XML.

``requests()`` reads nginx's access log (one JSON object per request:
method, path, range, status, body bytes sent, and the ``repo``/``filename``
query arguments the Hub puts on its redirects) as hubserver ``Request``
records, so tests and the benchmark can count what was fetched.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

EXPIRED_XML = "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
FORGED_XML = ("<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not "
              "match the signature you provided</Message></Error>")
START_TIMEOUT = 10.0
LOG_CAP = 64 << 20  # the access log of one test server stays far below this; never read more


def nginx_binary() -> str | None:
    """The nginx executable on PATH or in /usr/sbin (Debian puts it there, often off a user's PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"):
        p = os.path.join(d, "nginx")
        if os.access(p, os.X_OK):
            return p
    return None


@functools.cache
def _build_info(binary: str) -> str:
    """``nginx -V`` (version and configure arguments; nginx prints them on stderr)."""
    try:
        out = subprocess.run([binary, "-V"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.stderr + out.stdout).decode(errors="replace")


def _version(info: str) -> tuple[int, ...]:
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", info)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def _die_with_parent() -> None:
    """In the child before exec: on Linux, nginx gets SIGTERM when the process that started it dies (even by
    SIGKILL), so a killed test run or benchmark never leaves an nginx behind. Elsewhere, stop() is the only way."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NginxCDN:
    """nginx serving ``root`` statically on 127.0.0.1. A context manager, or start()/stop()."""

    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int = 0,
                 secure_link_secret: str | None = None) -> None:
        self.root = Path(root).resolve()
        self.host = host
        self._want_port = port
        self.port = 0
        self.secure_link_secret = secure_link_secret
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return nginx_binary() is not None

    @staticmethod
    def has_secure_link() -> bool:
        """Whether this nginx can check signed URLs (Debian's ``nginx`` can; older ``nginx-light`` builds cannot)."""
        binary = nginx_binary()
        return binary is not None and "http_secure_link_module" in _build_info(binary)

    @classmethod
    def skip_unless_available(cls) -> None:
        """pytest.skip (imported only here, so the benchmark need not have pytest) when nginx is missing."""
        if not cls.available():
            import pytest

            pytest.skip("nginx is not installed (make cdn-bin installs it); the nginx CDN tests skip")

    @property
    def access_log(self) -> Path:
        """nginx's access log: one JSON object per request (see the module docstring); gone after stop()."""
        if self._tmp is None:
            raise RuntimeError("NginxCDN is not started")
        return self._tmp / "access.log"

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("NginxCDN is not started")
        return f"http://{self.host}:{self.port}"

    # -- life cycle ----------------------------------------------------------------------

    def config(self, tmp: Path, port: int) -> str:
        """The whole nginx.conf: every path in ``tmp``, one listener, static files with ranges."""
        check = ""
        if self.secure_link_secret is not None:
            check = f"""
            secure_link $arg_Signature,$arg_Expires;
            secure_link_md5 "$secure_link_expires$uri {self.secure_link_secret}";
            if ($secure_link = "") {{ return 403 '{FORGED_XML}'; }}
            if ($secure_link = "0") {{ return 403 '{EXPIRED_XML}'; }}"""
        log = ('\'{"method":"$request_method","path":"$uri","range":"$http_range","status":$status,'
               '"sent":$body_bytes_sent,"auth":$airpack_auth,"repo":"$arg_repo","filename":"$arg_filename"}\'')
        return f"""daemon off;
master_process off;
worker_processes 1;
pid "{tmp}/nginx.pid";
error_log "{tmp}/error.log" warn;
events {{ worker_connections 4096; }}
http {{
    map $http_authorization $airpack_auth {{ "" 0; default 1; }}  # whether a token came, never the token
    log_format airpack escape=json {log};
    access_log "{tmp}/access.log" airpack;
    client_body_temp_path "{tmp}/client_body";
    proxy_temp_path "{tmp}/proxy";
    fastcgi_temp_path "{tmp}/fastcgi";
    uwsgi_temp_path "{tmp}/uwsgi";
    scgi_temp_path "{tmp}/scgi";
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000;
    keepalive_timeout 65;
    server_tokens off;
    server {{
        listen {self.host}:{port};
        root "{self.root}";
        location / {{{check}
        }}
    }}
}}
"""

    def start(self) -> NginxCDN:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (make cdn-bin installs it)")
        self._tmp = Path(tempfile.mkdtemp(prefix="airpack-nginx-"))
        last = ""
        for _ in range(3):  # a free port can be taken between choosing and binding it: choose again
            port = self._want_port or _free_port(self.host)
            conf = self._tmp / "nginx.conf"
            conf.write_text(self.config(self._tmp, port))
            # -e (nginx >= 1.19.5) keeps even the errors before the config is read out of /var/log.
            early = ["-e", str(self._tmp / "error.log")] if _version(_build_info(binary)) >= (1, 19, 5) else []
            self._proc = subprocess.Popen(
                [binary, "-p", str(self._tmp), *early, "-c", str(conf)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            if self._wait_ready(port):
                self.port = port
                return self
            last = self._error_tail()
            self._kill()
            if self._want_port:
                break
        self.stop()
        raise RuntimeError(f"nginx did not start: {last}")

    def _wait_ready(self, port: int) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection((self.host, port), timeout=0.5):
                return True
            time.sleep(0.02)
        return False

    def _error_tail(self) -> str:
        assert self._tmp is not None
        text = ""
        if self._proc is not None and self._proc.stderr is not None and self._proc.poll() is not None:
            text = self._proc.stderr.read(8192).decode(errors="replace")
        with contextlib.suppress(OSError), open(self._tmp / "error.log", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            text += f.read().decode(errors="replace")
        return " | ".join(line.strip() for line in text.splitlines()[-5:] if line.strip())

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # nginx: SIGTERM is a fast shutdown
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()

    def stop(self) -> None:
        self._kill()
        self.port = 0
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> NginxCDN:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what it served ------------------------------------------------------------------

    def log_lines(self) -> Iterator[dict[str, Any]]:
        """The access log so far, one dict per request (nginx writes each line when the request ends)."""
        if self._tmp is None:
            return
        try:
            with open(self.access_log, "rb") as f:
                data = f.read(LOG_CAP)
        except FileNotFoundError:
            return
        for line in data.splitlines():
            with contextlib.suppress(ValueError):
                yield json.loads(line)

    def requests(self) -> Iterator[Any]:
        """The access log as tests/hubserver.py ``Request`` records (origin "cdn")."""
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from hubserver import Request

        for d in self.log_lines():
            yield Request(origin="cdn", method=d.get("method", ""), path=d.get("path", ""),
                          range=d.get("range") or None, auth=bool(d.get("auth")),
                          repo_id=unquote_plus(d.get("repo") or "") or None,
                          file=unquote_plus(d.get("filename") or "") or None,
                          status=int(d.get("status") or 0), sent=int(d.get("sent") or 0))
