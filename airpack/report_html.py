"""The audit report as one self-contained HTML file, and its PDF through headless Chromium.

``render`` takes the report's facts exactly as ``--json`` prints them (the
``to_json`` of ``ops.report.BundleReport`` or ``RegistryReport``) and fills a
Jinja2 template under ``airpack/templates/``, so the document shows nothing
the facts do not. Everything in the facts that came from a bundle (file
names, licences, model configs) or an audit log is attacker-controlled:

- autoescape is on for every template, and nothing is concatenated into HTML
  by hand; the SVG charts are template markup too, fed numbers computed here;
- ``_visible`` runs on every ``{{ }}`` value (Jinja's ``finalize``): bidi
  overrides and isolates, zero-width and control characters are shown as
  ``<U+202E>``-style marks, so a name cannot reorder or hide what follows it;
- nothing is loaded: inline CSS and SVG, no script, no ``src``/``href`` other
  than ``#`` fragments, so the file opens on an isolated host as it is.

Print: ``@page`` A4 with margin boxes that carry the banner (UNVERIFIED, or
who signed) and the manifest digest on every page, and a page break before
each section. ``print_pdf`` runs Chromium with the network disabled and a
throwaway profile.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

from .errors import BrowserMissingError
from .units import format_bytes

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER_ENV = "AIRPACK_CHROMIUM"
PDF_TIMEOUT = 120

# Characters that change how the text around them is shown, or hide: bidi controls, zero-width marks, C0/C1 controls.
_INVISIBLE = re.compile("[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
_CSS_SAFE = re.compile(r"[^A-Za-z0-9 .,:;()/_+=@#%\-\u2014]")

COLORS = {"weights": "#4e79a7", "kv_cache": "#f28e2b", "activations": "#59a14f", "overhead": "#9c755f"}
LABELS = {"weights": "weights", "kv_cache": "KV cache", "activations": "activations", "overhead": "overhead"}


def _visible(value: Any) -> Any:
    """Every rendered string with its invisible and direction-changing characters shown as marks (``<U+202E>``)."""
    if isinstance(value, str):
        return _INVISIBLE.sub(lambda m: f"<U+{ord(m.group()):04X}>", value)
    return value


def css_string(value: object) -> str:
    """Text safe inside a CSS string in ``<style>`` (the print margin boxes): only plain letters, digits and punctuation."""
    return _CSS_SAFE.sub("?", str(value))[:300]


def _bytes(n: object) -> str:
    return format_bytes(n) if isinstance(n, int) and not isinstance(n, bool) else "-"


def _num(n: object) -> str:
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else "-"


# -- charts: geometry here, markup in the template -------------------------------------------------


def _ticks(top: int, n: int = 5) -> list[int]:
    """About ``n`` round steps (1, 2 or 5 times a power of ten) from 0 to ``top``."""
    rough = max(1, top // n)
    scale = 10 ** (len(str(rough)) - 1)
    step = next(m * scale for m in (1, 2, 5, 10) if m * scale * 4 >= rough * 3)
    return [step * i for i in range(top // step + 1)]


def _byte_ticks(top: int, n: int = 4) -> list[int]:
    """Round steps in binary units (e.g. 200 MiB, 5 GiB) from 0 to ``top`` bytes."""
    unit = 1
    while unit * 1024 <= max(1, top // n):
        unit *= 1024
    return [unit * t for t in _ticks(top // unit, n)]


def bar_chart(fit: Mapping[str, Any], width: int = 620) -> dict[str, Any] | None:
    """The stacked bar of one estimate against the GPU limit: segments, the limit line, the scale (bytes per GPU)."""
    bd = fit.get("breakdown") or {}
    limit = fit.get("limit_bytes")
    total = sum(int(bd.get(k, 0)) for k in COLORS)
    if not bd or not isinstance(limit, int) or limit <= 0:
        return None
    scale_top = max(limit, total) * 21 // 20 or 1
    x = 0.0
    segs = []
    for k, color in COLORS.items():
        v = int(bd.get(k, 0))
        w = width * v / scale_top
        segs.append({"key": k, "label": LABELS[k], "value": v, "text": format_bytes(v), "x": round(x, 2), "width": round(w, 2),
                     "color": color})
        x += w
    return {"width": width, "segments": segs, "limit_x": round(width * limit / scale_top, 2), "limit_text": format_bytes(limit),
            "total_text": format_bytes(total), "over": total > limit}


def curve_chart(fit: Mapping[str, Any], width: int = 620, height: int = 230) -> dict[str, Any] | None:
    """Memory per GPU against context length, the GPU limit, and the longest context that fits (plot coordinates)."""
    pts = [(int(p["context"]), int(p["per_gpu_bytes"])) for p in fit.get("curve") or []]
    limit = fit.get("limit_bytes")
    if len(pts) < 2 or not isinstance(limit, int):
        return None
    left, right, top_pad, bottom = 70, 16, 12, 34
    pw, ph = width - left - right, height - top_pad - bottom
    xmax = max(c for c, _ in pts) or 1
    peak = max(b for _, b in pts)
    off_scale = limit > 4 * peak  # far above the curve: the scale follows the curve, and the limit is named above it
    ymax = (peak if off_scale else max(peak, limit)) * 11 // 10 or 1

    def sx(c: int) -> float:
        return round(left + pw * c / xmax, 2)

    def sy(b: int) -> float:
        return round(top_pad + ph - ph * b / ymax, 2)

    best = fit.get("max_context")
    ctx = fit.get("context")
    return {
        "width": width, "height": height, "left": left, "right": width - right, "top": top_pad, "bottom": top_pad + ph,
        "points": " ".join(f"{sx(c)},{sy(b)}" for c, b in pts),
        "limit_y": None if off_scale else sy(limit), "limit_text": format_bytes(limit),
        "best_x": sx(best) if isinstance(best, int) and best > 0 else None, "best_text": _num(best),
        "ctx_x": sx(ctx) if isinstance(ctx, int) and ctx <= xmax else None, "ctx_text": _num(ctx),
        "xticks": [{"x": sx(t), "text": _num(t)} for t in _ticks(xmax)],
        "yticks": [{"y": sy(t), "text": format_bytes(t)} for t in _byte_ticks(ymax)],
    }


# -- rendering -----------------------------------------------------------------------------------


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("airpack", "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        finalize=_visible,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(bytes=_bytes, num=_num, css=css_string)
    env.globals.update(bar_chart=bar_chart, curve_chart=curve_chart, colors=COLORS, labels=LABELS)
    return env


def render(facts: Mapping[str, Any]) -> str:
    """The HTML document for a report's facts (``kind`` bundle or registry)."""
    kind = facts.get("kind")
    name = {"bundle": "bundle_report.html.j2", "registry": "registry_report.html.j2"}.get(str(kind))
    if name is None:
        raise ValueError(f"unknown report kind {kind!r}")
    return _environment().get_template(name).render(r=facts)


# -- printing ------------------------------------------------------------------------------------


def find_browser() -> str | None:
    """``AIRPACK_CHROMIUM``, else the first Chromium or Chrome on PATH; None when there is none."""
    given = os.environ.get(BROWSER_ENV)
    if given:
        return given if os.access(given, os.X_OK) and Path(given).is_file() else None
    return next((p for p in (shutil.which(b) for b in BROWSERS) if p), None)


def _missing() -> str:
    """Why no browser was found, naming what was looked for."""
    given = os.environ.get(BROWSER_ENV)
    if given:
        return f"{BROWSER_ENV} names {given}, which is not an executable file"
    return f"no Chromium found (looked for {', '.join(BROWSERS)} on PATH, and {BROWSER_ENV} is not set)"


def browser_args(browser: str, profile: str) -> list[str]:
    """Headless Chromium that cannot reach any network: every request goes to a proxy that is not there, loopback too."""
    args = [browser, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-sync", "--disable-component-update", "--disable-dev-shm-usage",
            "--disable-client-side-phishing-detection", "--disable-default-apps", "--disable-domain-reliability", "--no-pings",
            "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,AutofillServerCommunication,"
            "CertificateTransparencyComponentUpdater,Translate,InterestFeedContentSuggestions,PushMessaging",
            "--metrics-recording-only", "--no-service-autorun", "--safebrowsing-disable-auto-update", "--disable-breakpad",
            "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", f"--user-data-dir={profile}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return args


def run_browser(extra: Sequence[str], *, browser: str | None = None, timeout: int = PDF_TIMEOUT,
                proxy: str | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run headless Chromium once with a throwaway profile; ``proxy`` replaces the dead one (tests listen there)."""
    exe = browser or find_browser()
    if exe is None:
        raise BrowserMissingError(_missing())
    with tempfile.TemporaryDirectory(prefix="airpack-chromium-") as profile:
        args = browser_args(exe, profile)
        if proxy is not None:
            args = [a if not a.startswith("--proxy-server=") else f"--proxy-server={proxy}" for a in args]
        try:
            return subprocess.run([*args, *extra], capture_output=True, timeout=timeout, check=False,
                                  env={**os.environ, "HOME": profile})
        except subprocess.TimeoutExpired:
            raise BrowserMissingError(f"{exe} did not finish within {timeout} s") from None
        except OSError as e:
            raise BrowserMissingError(f"cannot run {exe}: {e.strerror}") from None


def print_pdf(html: Path, pdf: Path) -> None:
    """Print the HTML report to ``pdf`` (A4, as its ``@page`` rules say); the HTML stays whatever happens."""
    exe = find_browser()
    if exe is None:
        raise BrowserMissingError(f"wrote {html}, but no PDF: {_missing()}", path=str(pdf))
    tmp = pdf.with_name(f".{pdf.name}.tmp")
    r = run_browser(["--no-pdf-header-footer", f"--print-to-pdf={tmp}", Path(html).resolve().as_uri()], browser=exe)
    if r.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        tail = r.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise BrowserMissingError(f"wrote {html}, but {exe} could not print it to PDF (exit {r.returncode}: {tail[0][:300]})",
                                  path=str(pdf))
    os.replace(tmp, pdf)
