"""What every command shares: --json/-q/-v, the one exit surface, progress bars.

This package is the only place that imports click and tqdm (tqdm only when a
progress bar is drawn). Every way a command ends goes through here: a result
through ``Output.result``, any exception through ``fail``, which asks
``describe`` for its exit code, its ``--json`` record and its text, and
prints one or the other.
"""

from __future__ import annotations

import functools
import io
import os
import pathlib
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from .._fs import read_capped
from .._json import dumps_output, printable
from ..errors import AirpackError, BrokenPipe, BundleMismatchError, InternalError, Interrupted, UsageError, as_airpack_error
from ..progress import NULL_PROGRESS, Progress, ProgressTask

if TYPE_CHECKING:
    from tqdm import tqdm

F = TypeVar("F", bound=Callable[..., Any])

# -- progress --------------------------------------------------------------------------


class _TqdmTask:
    def __init__(self, bar: tqdm[Any], lock: threading.Lock) -> None:
        self._bar = bar
        self._lock = lock

    def advance(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        with self._lock:
            self._bar.close()


class TqdmProgress:
    """Progress bars on stderr, safe to advance from worker threads (tqdm is imported on the first bar)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def task(self, label: str, total: int, *, unit: str = "B") -> ProgressTask:
        from tqdm import tqdm

        with self._lock:
            bar = tqdm(
                total=total, desc=printable(label), unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.2,
            )
        return _TqdmTask(bar, self._lock)

    def message(self, text: str) -> None:
        from tqdm import tqdm

        with self._lock:
            tqdm.write(printable(text), file=sys.stderr)


# -- the exit surface ------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """How a command ends on an exception: its exit code, its ``--json`` error object, its text for stderr."""

    exit_code: int
    record: dict[str, Any] | None  # printed as {"error": record} with --json; None: nothing on stdout
    text: str  # printed on stderr without --json ("" for nothing)


def _error_lines(e: AirpackError, *, verbose: int) -> list[str]:
    if isinstance(e, InternalError):
        lines = [f"internal error (a bug in airpack, please report it): {e.message.removeprefix('internal error: ')}"]
        if verbose and e.__cause__ is not None:
            lines += "".join(traceback.format_exception(e.__cause__)).rstrip("\n").splitlines()
        return lines
    lines = [f"error: {e.message}"]
    if isinstance(e, BundleMismatchError):
        lines += [f"  {line}" for line in e.report.lines()[: None if verbose else 50]]
        if not verbose and e.count > 50:
            lines.append(f"  ... and {e.count - 50} more (use -v for all)")
    if e.hint:
        lines.append(f"hint: {e.hint}")
    return lines


def describe(e: BaseException, *, verbose: int = 0) -> Failure:
    """The one mapping of any exception to how the command ends.

    An ``AirpackError`` leaves with its own exit code and record; a click usage error is a
    ``UsageError`` (exit 2); Ctrl-C is exit 130 (text only, as an interrupted command has no
    result); stdout closed by its reader (``| head``) is exit 141 with nothing printed, as a
    command killed by SIGPIPE ends; an OSError the OS raised is its named error
    (``errors.from_oserror``); anything else is a bug, an ``InternalError`` (exit 1).
    """
    if isinstance(e, click.exceptions.Exit):  # --help, --version: not an error
        return Failure(e.exit_code, None, "")
    if isinstance(e, (BrokenPipeError, BrokenPipe)):
        return Failure(BrokenPipe.exit_code, None, "")
    if isinstance(e, click.exceptions.Abort):  # Ctrl-C or end of input while click parsed or prompted
        return Failure(Interrupted.exit_code, None, "aborted")
    if isinstance(e, (KeyboardInterrupt, Interrupted)):
        return Failure(Interrupted.exit_code, None, "interrupted")
    if isinstance(e, click.ClickException):
        buf = io.StringIO()
        e.show(file=buf)
        return Failure(UsageError.exit_code, UsageError(e.format_message()).to_json(), buf.getvalue().rstrip("\n"))
    err = as_airpack_error(e)
    if err is not e:
        err.__cause__ = e
    return Failure(err.exit_code, err.to_json(), "\n".join(_error_lines(err, verbose=verbose)))


def _dumps(doc: Any) -> str:
    """One JSON document: the result must be JSON by construction (a Path or a datetime here is a bug).

    Names that are not UTF-8 are escaped (``_json.printable``), so the document is always valid Unicode.
    """
    return dumps_output(doc)


def echo(text: str, *, err: bool = False) -> None:
    """Print one line of text, with names that are not UTF-8 escaped as ``\\xNN`` (never a UnicodeEncodeError)."""
    click.echo(printable(text), err=err)


def stdout_gone() -> NoReturn:
    """The reader of stdout went away: point stdout at /dev/null (so the exit flush cannot fail) and exit 141."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):  # stdout is no real file (a test's buffer): nothing to flush
        pass
    sys.exit(BrokenPipe.exit_code)


def fail(e: BaseException, *, as_json: bool, verbose: int = 0, partial: dict[str, Any] | None = None) -> NoReturn:
    """End the command for ``e``: print its ``--json`` error (merged into ``partial``, the result so far) or its text."""
    f = describe(e, verbose=verbose)
    if f.exit_code == BrokenPipe.exit_code:
        stdout_gone()
    try:
        if as_json and f.record is not None:
            click.echo(_dumps({**(partial or {}), "error": f.record}))
        elif f.text:
            echo(f.text, err=True)
    except BrokenPipeError:
        stdout_gone()
    sys.exit(f.exit_code)


# -- output ----------------------------------------------------------------------------


class Output:
    """Where a command's results go: text on stdout, or exactly one JSON document."""

    def __init__(self, *, as_json: bool, quiet: bool, verbose: int) -> None:
        self.as_json = as_json
        self.quiet = quiet
        self.verbose = verbose
        self.partial: dict[str, Any] | None = None

    @property
    def progress(self) -> Progress:
        if self.as_json or self.quiet or not sys.stderr.isatty():
            return NULL_PROGRESS
        return TqdmProgress()

    def _text(self, text: Callable[[], list[str]] | list[str] | None) -> None:
        if self.quiet or text is None:
            return
        for line in text() if callable(text) else text:
            echo(line)

    def result(self, data: Any, text: Callable[[], list[str]] | list[str] | None = None) -> None:
        if self.as_json:
            click.echo(_dumps(data))
            return
        self._text(text)

    def result_then_fail(self, data: dict[str, Any], text: Callable[[], list[str]] | list[str] | None, error: AirpackError) -> NoReturn:
        """A result that is also a failure (``fit`` that does not fit): the text, or the JSON with ``error`` added, then the exit."""
        if self.as_json:
            self.partial = data  # printed by ``fail``, with the error added
        else:
            self._text(text)
        raise error

    def info(self, text: str) -> None:
        """A log line on stderr (never in --json or -q mode)."""
        if not self.as_json and not self.quiet:
            echo(text, err=True)

    def warn(self, message: str) -> None:
        """A warning (a private key or PIN file others can read) on stderr, in every mode but -q: --json keeps stdout."""
        if not self.quiet:
            echo(f"warning: {message}", err=True)


def hub_token(token_file: pathlib.Path | None) -> str | None:
    """The Hub token of ``pack`` and ``fit``: the first line of ``--token-file``, else HF_TOKEN; never printed.

    One reader for both commands, so a missing, empty or non-UTF-8 token file means the same in each.
    """
    if token_file is None:
        return os.environ.get("HF_TOKEN", "").strip() or None
    try:
        return read_capped(token_file, 4096, what="token file").decode("utf-8").strip() or None
    except FileNotFoundError:
        raise UsageError(f"token file {token_file} not found", path=str(token_file)) from None
    except UnicodeDecodeError:
        raise UsageError(f"token file {token_file} is not UTF-8 text", path=str(token_file)) from None


def airpack_command(group: click.Group, name: str, **kwargs: Any) -> Callable[[F], click.Command]:
    """Register ``fn(out, **options)`` as a command with --json, -q and -v; every exception leaves through ``fail``."""

    def deco(fn: F) -> click.Command:
        @functools.wraps(fn)
        def wrapper(as_json: bool, quiet: bool, verbose: int, **kw: Any) -> None:
            out = Output(as_json=as_json, quiet=quiet, verbose=verbose)
            try:
                fn(out, **kw)
            except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
                raise  # main() maps these, with the same function
            except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the one place a bug becomes exit 1
                fail(e, as_json=as_json, verbose=verbose, partial=out.partial)
            try:
                sys.stdout.flush()  # a closed pipe shows here, while it can still become exit 141
            except BrokenPipeError:
                stdout_gone()

        wrapper = click.option("-v", "--verbose", count=True, help="More detail on stderr.")(wrapper)
        wrapper = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")(wrapper)
        wrapper = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")(wrapper)
        return group.command(name, **kwargs)(wrapper)

    return deco


# -- signing keys --------------------------------------------------------------------------

KEY_METAVAR = "KEY|PKCS11_URI"
KEY_HELP = ("a private key file, or a key on a token as an RFC 7512 URI "
            "(pkcs11:token=...;object=...?module-path=...&pin-source=file:...)")


def pin_file_option(fn: F) -> F:
    """``--pin-file``, beside every ``--key``: the PIN of a token key (never a command-line value)."""
    option = click.option(
        "--pin-file", type=click.Path(dir_okay=False, path_type=pathlib.Path),
        help="PIN of a token key: the first line of this file (or pin-source in the URI, or AIRPACK_PIN).",
    )
    return option(fn)
