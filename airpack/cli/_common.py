"""What every command shares: --json/-q/-v, error-to-exit-code mapping, progress bars.

This package is the only place that imports click and tqdm. Errors are
mapped to exit codes here and nowhere else.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import click
from tqdm import tqdm

from ..errors import AirpackError, BundleMismatchError
from ..progress import NULL_PROGRESS, Progress, ProgressTask

F = TypeVar("F", bound=Callable[..., Any])


def human_bytes(n: int) -> str:
    step = 1024.0
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < step or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.2f} {unit}"
        v /= step
    return f"{n} B"


class _TqdmTask:
    def __init__(self, bar: tqdm, lock: threading.Lock) -> None:  # type: ignore[type-arg]
        self._bar = bar
        self._lock = lock

    def advance(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        with self._lock:
            self._bar.close()


class TqdmProgress:
    """Progress bars on stderr, safe to advance from worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def task(self, label: str, total: int, *, unit: str = "B") -> ProgressTask:
        with self._lock:
            bar = tqdm(
                total=total, desc=label, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.2,
            )
        return _TqdmTask(bar, self._lock)

    def message(self, text: str) -> None:
        with self._lock:
            tqdm.write(text, file=sys.stderr)


class Output:
    """Where a command's results go: text on stdout, or exactly one JSON document."""

    def __init__(self, *, as_json: bool, quiet: bool, verbose: int) -> None:
        self.as_json = as_json
        self.quiet = quiet
        self.verbose = verbose

    @property
    def progress(self) -> Progress:
        if self.as_json or self.quiet or not sys.stderr.isatty():
            return NULL_PROGRESS
        return TqdmProgress()

    def result(self, data: Any, text: Callable[[], list[str]] | list[str] | None = None) -> None:
        if self.as_json:
            click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
            return
        if self.quiet or text is None:
            return
        lines = text() if callable(text) else text
        for line in lines:
            click.echo(line)

    def info(self, text: str) -> None:
        """A log line on stderr (never in --json or -q mode)."""
        if not self.as_json and not self.quiet:
            click.echo(text, err=True)

    def error(self, e: AirpackError) -> None:
        if self.as_json:
            click.echo(json.dumps({"error": e.to_json()}, indent=2, sort_keys=True, default=str))
            return
        click.echo(f"error: {e.message}", err=True)
        if isinstance(e, BundleMismatchError):
            for line in e.report.lines()[: None if self.verbose else 50]:
                click.echo(f"  {line}", err=True)
            if not self.verbose and e.count > 50:
                click.echo(f"  ... and {e.count - 50} more (use -v for all)", err=True)
        if e.hint:
            click.echo(f"hint: {e.hint}", err=True)


def airpack_command(group: click.Group, name: str, **kwargs: Any) -> Callable[[F], click.Command]:
    """Register ``fn(out, **options)`` as a command with --json, -q and -v and the error mapping."""

    def deco(fn: F) -> click.Command:
        @functools.wraps(fn)
        def wrapper(as_json: bool, quiet: bool, verbose: int, **kw: Any) -> None:
            out = Output(as_json=as_json, quiet=quiet, verbose=verbose)
            try:
                fn(out, **kw)
            except AirpackError as e:
                out.error(e)
                sys.exit(e.exit_code)
            except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
                raise
            except KeyboardInterrupt:
                click.echo("interrupted", err=True)
                sys.exit(130)
            except Exception as e:  # noqa: BLE001 - the one place a bug becomes exit 1
                if as_json:
                    click.echo(json.dumps({"error": {"exit_code": 1, "type": "InternalError", "message": f"internal error: {e!r}", "path": None}}))
                else:
                    click.echo(f"internal error (a bug in airpack, please report it): {e!r}", err=True)
                    if verbose:
                        traceback.print_exc()
                sys.exit(1)

        wrapper = click.option("-v", "--verbose", count=True, help="More detail on stderr.")(wrapper)
        wrapper = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")(wrapper)
        wrapper = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")(wrapper)
        return group.command(name, **kwargs)(wrapper)

    return deco
