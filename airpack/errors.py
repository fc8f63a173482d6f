"""The one exception tree of airpack, and the one mapping of any exception to its JSON record.

Every refusal is a named class carrying its exit code (DESIGN.md, "Exit
codes") and a hint that tells the user what to do next. ``error_record``
turns any exception into the object that ``--json`` prints under ``"error"``
and the audit log keeps: an ``AirpackError`` as itself, anything else (a bug)
as an ``InternalError`` (exit 1) whose message names the original class. The
CLI maps these to exit codes in one place; nothing else calls ``sys.exit``.

Trust failures (who signed, the envelope) and integrity failures (the bytes
once the signature holds) are kept apart, as are transport failures (fetch)
and local resource failures, so a script can tell them apart by exit code.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any


class AirpackError(Exception):
    """Base of every error airpack raises on purpose."""

    exit_code: int = 1
    default_hint: str = ""

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "exit_code": self.exit_code,
            "type": type(self).__name__,
            "message": self.message,
            "path": self.path,
        }
        if self.hint:
            out["hint"] = self.hint
        return out


# -- 1: internal error (a bug) -------------------------------------------------


class InternalError(AirpackError):
    """An exception airpack did not raise on purpose: a bug. Its message names the original class."""

    exit_code = 1

    @classmethod
    def wrap(cls, e: BaseException) -> InternalError:
        return cls(f"internal error: {e!r}")


# -- 2: usage and configuration ------------------------------------------------


class UsageError(AirpackError):
    """A bad flag, spec, policy or key file: the user must change the input."""

    exit_code = 2


class SpecError(UsageError):
    default_hint = "Fix the pack spec; see docs/spec.md for every field."


class KeyFileError(UsageError):
    default_hint = "Check the key file and its passphrase (--passphrase-file or AIRPACK_PASSPHRASE)."


class TokenError(UsageError):
    """A key on a hardware token (PKCS#11) could not be used: the URI, the module, the token, the key, the PIN.

    Exit 2 like a bad key file: the signer fixes the set-up, and nothing was written.
    """

    default_hint = "Check the PKCS#11 URI, the module path and the PIN source; docs/keys.md shows the set-up."


class Pkcs11UriError(TokenError):
    """A ``pkcs11:`` key reference that is not a usable RFC 7512 URI (or carries a PIN in it)."""

    default_hint = ("Write it as pkcs11:token=LABEL;object=LABEL?module-path=/path/to/module.so&pin-source=file:/path "
                    "(RFC 7512); see docs/keys.md.")


class TokenModuleError(TokenError):
    """No PKCS#11 module path, or a path that is missing or is no PKCS#11 module."""

    default_hint = ("Give the vendor's PKCS#11 module as ?module-path=/abs/path.so in the URI or in AIRPACK_PKCS11_MODULE "
                    "(SoftHSM2: /usr/lib/softhsm/libsofthsm2.so; YubiKey: libykcs11.so; smart cards: opensc-pkcs11.so).")


class TokenNotFoundError(TokenError):
    """No token (or more than one) matches the URI's token attributes."""

    default_hint = "Insert the token, or fix token= (and serial=) in the URI; `softhsm2-util --show-slots` or `p11tool --list-tokens` lists them."


class TokenKeyError(TokenError):
    """No key object (or more than one) matches, or the one that matches may not sign or is of a type airpack does not sign with."""

    default_hint = ("Fix object= (or id=) in the URI; airpack signs with ECDSA P-256 or Ed25519 private keys whose CKA_SIGN is true. "
                    "`airpack keygen NAME --pkcs11 URI` makes one.")


class TokenPinError(TokenError):
    """The token refused the PIN (wrong, locked, expired) or none was given. A PIN is tried once and never retried."""

    default_hint = ("Fix the PIN source (pin-source=file:... in the URI, --pin-file, or AIRPACK_PIN) and run again; "
                    "airpack never retries a PIN, so a token counts one failure per run.")


class TokenRemovedError(TokenError):
    """The token went away (removed, reset, session lost) while airpack was using it; nothing was written."""

    default_hint = "Reinsert the token and run the command again; the bundle was left as it was."


class PolicyError(UsageError):
    default_hint = "Check the trust policy file; `airpack trust list POLICY` shows it."


class ModelConfigError(UsageError):
    """config.json or the weight files do not describe a model the VRAM estimator understands."""

    default_hint = "`airpack fit` needs a config.json and safetensors weights; see docs/fit.md for what it reads."


class ContextTooLongError(ModelConfigError):
    """A requested context longer than the model's own maximum (``max_position_embeddings`` in config.json).

    No fit verdict is given for it: the model cannot run at that length on any GPU. A
    ``ModelConfigError``, so install's gate reports the model's fit as ``unknown`` with this
    reason rather than "fits".
    """

    default_hint = "Ask for at most the model's maximum context (--context), or leave --context out to use it."


class TraceUnavailableError(UsageError):
    """``fit --trace`` on a host without PyTorch and transformers: the trace runs them, so it cannot run here."""

    default_hint = "pip install 'airpack[trace]' (CPU PyTorch is enough), or fit without --trace."


class PriceFileError(UsageError):
    """A ``fit --plan --prices`` file that is not the TOML the plan reads (unknown GPU or key, bad number)."""

    default_hint = "See docs/fit.md, \"The plan\", for the price file's form: [prices] GPU = { hour = 2.5 } or { card = 30000 }."


class GpuSpecError(UsageError):
    """A --gpu value (or a spec target) that names no known GPU or size."""

    default_hint = "Give a GPU name like H100-80GB:2, a size like 24GiB:1, or see docs/fit.md for the catalog."


class NotABundleError(UsageError):
    """What the operator named is no bundle at all (a model folder, an unfinished pack, parts without their index, a plain file).

    A usage error, not a trust failure: nothing was signed, so there is no signature to doubt; the
    message says what the thing is, and the hint what to do with it.
    """

    default_hint = "Give a bundle folder (with envelope.dsse.json), a bundle tar, or a parts folder with its *.index.dsse.json."


class PathTooLongError(UsageError):
    """A path (or one of its names) longer than the operating system allows (ENAMETOOLONG)."""

    default_hint = "Choose a shorter path: most filesystems allow 255 bytes per name and 4096 per path."


class ProfileError(UsageError):
    """A host profile (``airpack profile --out``) that is not the strict document airpack writes: not JSON, another
    ``_type``, a duplicate key, an unknown field, over the size cap, or a GPU the catalog does not know."""

    default_hint = "Write the profile again on the offline host: airpack profile --registry DIR --out PROFILE.json (docs/profile.md)."


class NoGpuError(UsageError):
    """No GPU could be detected on this host (no NVML library, no driver, or no device)."""

    default_hint = "Pass --gpu NAME[:COUNT] (e.g. --gpu H100-80GB:2) to estimate for a GPU that is not here."


class ReportOutputError(UsageError):
    """A report's output path exists already, is a folder, or cannot be written; nothing was written."""

    default_hint = "Choose another --out / --pdf path, or pass --force to replace an existing report file."


class BrowserMissingError(UsageError):
    """``report --pdf`` found no headless Chromium to print with (the HTML report was still written), or it failed."""

    default_hint = ("Install Chromium (Debian: apt-get install chromium) or point AIRPACK_CHROMIUM at a Chromium or Chrome "
                    "binary; or open the HTML report in any browser and print it to PDF.")


# -- 3: integrity ----------------------------------------------------------------


class IntegrityError(AirpackError):
    """The content does not match what was signed, or is unsafe to read."""

    exit_code = 3
    default_hint = "Do not use this bundle; get a fresh copy from the packer."


class UnsafePathError(IntegrityError):
    """A path that could escape the bundle or alias another (traversal, link, collision)."""


class MalformedManifestError(IntegrityError):
    """The signed payload parsed, but its content is not a valid airpack manifest."""


class MalformedSafetensorsError(IntegrityError):
    """A safetensors header that is not well formed."""


class MalformedWeightsError(IntegrityError):
    """A weight file of another header-checked format (GGUF) whose header is not well formed."""


class ContentPolicyError(IntegrityError):
    """Pickled weights or code that the spec (or the operator) does not allow."""

    default_hint = "Set allow_pickle / allow_code in the spec's [policy] only if you trust this code."


@dataclass(frozen=True)
class FileMismatch:
    """One changed file: what was signed against what is there."""

    path: str
    reason: str
    expected_size: int | None = None
    actual_size: int | None = None
    expected_sha256: str | None = None
    actual_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "reason": self.reason,
            "expected_size": self.expected_size,
            "actual_size": self.actual_size,
            "expected_sha256": self.expected_sha256,
            "actual_sha256": self.actual_sha256,
        }


@dataclass(frozen=True)
class MismatchReport:
    """Every file that differs from the manifest, as model_signing reports it."""

    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    changed: tuple[FileMismatch, ...] = field(default_factory=tuple)

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.changed)

    def to_json(self) -> dict[str, Any]:
        return {
            "missing": list(self.missing),
            "extra": list(self.extra),
            "changed": [c.to_json() for c in self.changed],
        }

    def lines(self) -> list[str]:
        out = [f"missing: {p}" for p in self.missing]
        out += [f"extra:   {p}" for p in self.extra]
        for c in self.changed:
            if c.expected_sha256 and c.actual_sha256:
                out.append(
                    f"changed: {c.path} ({c.reason}; expected sha256 {c.expected_sha256}, got {c.actual_sha256})"
                )
            elif c.expected_size is not None and c.actual_size is not None:
                out.append(
                    f"changed: {c.path} ({c.reason}; expected {c.expected_size} bytes, got {c.actual_size})"
                )
            else:
                out.append(f"changed: {c.path} ({c.reason})")
        return out


class BundleMismatchError(IntegrityError):
    """Files missing, extra or changed; carries the full report."""

    def __init__(self, report: MismatchReport, *, path: str | None = None) -> None:
        first = (report.missing or report.extra or tuple(c.path for c in report.changed) or ("?",))[0]
        n = len(report.missing) + len(report.extra) + len(report.changed)
        parts = []
        if report.missing:
            parts.append(f"{len(report.missing)} missing")
        if report.extra:
            parts.append(f"{len(report.extra)} extra")
        if report.changed:
            parts.append(f"{len(report.changed)} changed")
        super().__init__(
            f"bundle content does not match its manifest: {', '.join(parts)} file(s); first: {first}",
            path=path or first,
        )
        self.report = report
        self.count = n

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["mismatch"] = self.report.to_json()
        return out


class AuditLogError(IntegrityError):
    """The audit log's hash chain is broken; ``line`` is the first bad line (1-based)."""

    default_hint = "The audit log was edited, truncated or reordered; keep the file as evidence and investigate."

    def __init__(self, message: str, *, line: int, path: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, path=path, hint=hint)
        self.line = line

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["line"] = self.line
        return out


class _ReportedIntegrityError(IntegrityError):
    """An integrity failure that carries the whole ``MismatchReport`` (every file that differs, under "mismatch").

    A shared base for the two errors that report one, not a class to catch: ``except`` clauses
    name ``RegistryDamageError`` or ``HostFilesError``, which stay unrelated to each other.
    """

    def __init__(self, message: str, *, report: MismatchReport, path: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, path=path, hint=hint)
        self.report = report

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["mismatch"] = self.report.to_json()
        return out


class RegistryDamageError(_ReportedIntegrityError):
    """``airpack check``: installed files, links, refs, kept envelopes or the audit log differ from the database."""

    default_hint = ("Do not load models from this registry until you know why; reinstall the named bundles "
                    "from their media (remove, then install) and keep the audit log as evidence.")


class HostFilesError(_ReportedIntegrityError):
    """A delta bundle relies on files the registry does not hold intact: missing, with other bytes, or a link.

    The registry's database is not taken on its word: every copy is hashed
    again (its disk may have rotted or been changed), and nothing is written.
    """

    default_hint = ("Write a fresh profile (airpack profile) and pack again for it, or carry the full bundle "
                    "(pack without --for); `airpack check --registry DIR` shows what else is damaged.")


class PartsError(IntegrityError):
    """Parts of a split export that are missing, damaged, or belong to another export; named one by one."""

    default_hint = "Run `airpack repair DIR` if the export has enough parity parts; otherwise copy the named parts again."

    def __init__(self, message: str, *, missing: tuple[str, ...] = (), bad: tuple[tuple[str, str], ...] = (),
                 path: str | None = None, hint: str | None = None) -> None:
        first = (missing or tuple(b[0] for b in bad) or (None,))[0]
        super().__init__(message, path=path or first, hint=hint)
        self.missing = missing
        self.bad = bad

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["parts"] = {"missing": list(self.missing), "bad": [{"name": n, "reason": r} for n, r in self.bad]}
        return out


# -- 4: trust --------------------------------------------------------------------


class TrustError(AirpackError):
    """Who signed, the envelope, freshness: the bundle cannot be trusted."""

    exit_code = 4
    default_hint = "Check that the bundle was signed by keys in this host's trust policy."


class EnvelopeError(TrustError):
    """The DSSE envelope is missing, oversized, malformed or of an unknown type."""


class SignatureError(TrustError):
    """Too few distinct trusted keys signed the exact payload."""


class ExpiredError(TrustError):
    default_hint = "Ask the packer for a fresh bundle; an expired one is never accepted."


class KeyNotValidError(SignatureError):
    """Signatures over the exact payload by policy keys that no longer count (revoked, or past their expiry), too few others.

    A subclass of ``SignatureError`` (exit 4): the threshold is not met. Its message names each such key,
    its state and the revocation reason or expiry time, so the operator knows it is the key, not the bytes.
    """

    default_hint = ("A revoked key never counts again and an expired one no longer counts: ask for the bundle to be "
                    "re-signed (`airpack sign BUNDLE --key KEY`) by keys the trust policy holds as valid.")


class PolicyUpdateError(SignatureError):
    """A signed trust policy update without the threshold of the current policy's valid keys, or of the new policy's keys."""

    default_hint = ("Have the missing signers add their signature with `airpack trust sign-update UPDATE.dsse.json --key KEY`, "
                    "then apply it again; nothing was changed.")


class RollbackError(TrustError):
    default_hint = "Install a bundle with a higher sequence, or use `airpack rollback` to go back on purpose."


class PolicyReplayError(RollbackError):
    """A trust policy update whose version is not above the policy in force: an old update replayed, or one already applied."""

    default_hint = ("Ask the security team for the newest update; an update applies only over a policy with a lower version "
                    "(`airpack trust list POLICY` shows it).")


class SequenceJumpError(TrustError):
    """A sequence far beyond the channel's highest installed one (a leaked key jumping to the end)."""

    default_hint = "Ask the packer why the sequence jumped; a channel may grow by at most 1,000,000 per install."


class NoLongerTrustedError(TrustError):
    """``airpack check --trust``: installed bundles whose kept envelope today's policy no longer accepts."""

    default_hint = "Re-sign those bundles with keys of the current policy and reinstall them, or remove them."


# -- 5: fit ----------------------------------------------------------------------


class FitError(AirpackError):
    """The model does not fit the target GPUs."""

    exit_code = 5
    default_hint = "Use more or larger GPUs, a higher --gpu-memory-utilization, or a shorter --context."


# -- 6: registry -----------------------------------------------------------------


class RegistryError(AirpackError):
    exit_code = 6


class LockHeldError(RegistryError):
    default_hint = "Another airpack process is writing this registry; wait for it to finish."


class NotInstalledError(RegistryError):
    default_hint = "`airpack list --registry DIR` shows what is installed."


class ConflictError(RegistryError):
    pass


class SnapshotMissingError(RegistryError):
    """An installed revision whose snapshot (or a file of it) is gone from ``hub/``: deleted by hand or by a cache tool."""

    default_hint = "Remove that revision (`airpack remove REPO --revision COMMIT`), then install its bundle again from the medium."


class UnsafeRegistryError(RegistryError):
    """A link or odd file planted where the registry would write."""

    default_hint = "Someone changed the registry by hand; inspect the named path, remove it, then retry."


# -- 7: fetch --------------------------------------------------------------------


class FetchError(AirpackError):
    """The Hub or a package index could not give us what we asked for."""

    exit_code = 7
    default_hint = "Check the network, the endpoint and your token, then run pack again: it resumes."


class RevisionNotFoundError(FetchError):
    default_hint = "Check the repo id and revision (branch, tag or commit) in the spec."


class GatedRepoError(FetchError):
    default_hint = "Accept the model's licence on the Hub and pass a token (HF_TOKEN or --token-file)."


# -- 8: resources ----------------------------------------------------------------


class ResourceError(AirpackError):
    """The host refused what the command needed: disk space, a permission, a device that failed."""

    exit_code = 8
    default_hint = "Check the named path's filesystem and medium (free space, permissions, read errors), then run the command again."


class DiskSpaceError(ResourceError):
    default_hint = "Free disk space or choose another --out on a larger filesystem."


class AccessDeniedError(ResourceError):
    default_hint = "Check the permissions of the folder airpack writes to."


# -- 141: stdout closed ----------------------------------------------------------------


class BrokenPipe(AirpackError):
    """Whoever read stdout went away (``airpack list | head``): the command stops quietly, as a SIGPIPE would stop it.

    Nothing is printed for it (there is no reader left); the record exists for the audit log.
    """

    exit_code = 141  # 128 + SIGPIPE, what a shell reports for git or coreutils in the same pipe
    default_hint = "Nothing is wrong: the reader of the output (head, a closed terminal) stopped; run without it for all of it."


# -- 130: interrupted ----------------------------------------------------------------


class Interrupted(AirpackError):
    """Ctrl-C (SIGINT): the user stopped the command; what it was writing is left as a crash would leave it."""

    exit_code = 130


# -- the one mapping ----------------------------------------------------------------


_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_DENIED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def from_oserror(e: OSError, what: str = "cannot access", path: str | None = None) -> AirpackError:
    """The one mapping of an operating-system error to the named airpack error (``what path: reason``).

    A full disk or quota is ``DiskSpaceError``, a refused permission or a read-only filesystem
    ``AccessDeniedError`` (both exit 8), a name over the OS limit ``PathTooLongError`` (exit 2,
    the user picks another path); every other errno is a ``ResourceError`` (exit 8). ``path``
    defaults to the file the error names.
    """
    if path is None:
        path = e.filename if isinstance(e.filename, str) else (None if e.filename is None else str(e.filename))
    where = f"{what} {path}" if path else f"{what} a file (the operating system did not say which)"
    reason = e.strerror or type(e).__name__
    if e.errno in _DISK_FULL:
        return DiskSpaceError(f"{where}: no space left on device", path=path)
    if e.errno in _DENIED:
        return AccessDeniedError(f"{where}: {reason}", path=path)
    if e.errno == errno.ENAMETOOLONG:
        return PathTooLongError(f"{where}: the name is longer than the operating system allows", path=path)
    return ResourceError(f"{where}: {reason}", path=path)


def as_airpack_error(e: BaseException) -> AirpackError:
    """``e`` itself when airpack raised it on purpose; an interrupt as ``Interrupted``; anything else as an ``InternalError``.

    An ``OSError`` that carries an errno (the OS refused: a permission, a full disk, a name too long)
    is the named error of ``from_oserror`` wherever it was raised, so no call site needs its own
    try/except to avoid exit 1; a closed pipe on stdout is ``BrokenPipe``. An ``OSError`` without
    an errno was raised by code, not by the OS, and stays a bug.
    """
    if isinstance(e, AirpackError):
        return e
    if isinstance(e, KeyboardInterrupt):
        return Interrupted("interrupted")
    if isinstance(e, BrokenPipeError):
        return BrokenPipe("stdout was closed")
    if isinstance(e, OSError) and e.errno is not None:
        return from_oserror(e)
    return InternalError.wrap(e)


def error_record(e: BaseException) -> dict[str, Any]:
    """The JSON object of an error, as ``--json`` prints it under ``"error"``.

    ``exit_code``, ``type``, ``message``, ``path``, ``hint`` when there is one, and what the
    class adds (a mismatch report, the bad audit line, the damaged parts). A bug is an
    ``InternalError`` whose message names the original exception.
    """
    return as_airpack_error(e).to_json()
