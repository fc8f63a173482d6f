"""push and pull: the cluster transport's commands, and the registry flags ``install oci://`` shares."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .._fs import read_capped
from ..errors import UsageError
from ..oci_ref import parse_ref
from ..units import format_bytes, parse_size
from . import cli
from ._common import Output, airpack_command

if TYPE_CHECKING:
    from ..fetch.oci import OciAccess
    from ..ops.oci import PullResult

# The network code (requests, oras) is imported inside the commands that use it, so that
# loading the CLI for an offline command (verify, install from a folder) never loads it.

PathArg = click.Path(path_type=Path)


def _password(password_file: Path | None) -> str | None:
    if password_file is not None:
        try:
            data = read_capped(password_file, 4096, what="password file")
        except FileNotFoundError:
            raise UsageError(f"password file {password_file} not found", path=str(password_file)) from None
        lines = data.decode("utf-8", "replace").splitlines()
        return lines[0] if lines else ""
    return os.environ.get("AIRPACK_OCI_PASSWORD")


def access_from(plain_http: bool, username: str | None, password_file: Path | None, ca_file: Path | None) -> OciAccess:
    from ..fetch.oci import OciAccess

    password = _password(password_file) if username is not None or password_file is not None else None
    if password_file is not None and username is None:
        raise UsageError("--password-file needs --username")
    if username is not None and password is None:
        raise UsageError("--username needs --password-file (or AIRPACK_OCI_PASSWORD)")
    return OciAccess(plain_http=plain_http, username=username, password=password, ca_file=ca_file)


def access_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The flags that say how to reach a registry (never whom to trust)."""
    fn = click.option("--ca-file", type=PathArg, envvar="AIRPACK_OCI_CA_FILE",
                      help="CA bundle (PEM) that signed the registry's TLS certificate (or AIRPACK_OCI_CA_FILE).")(fn)
    fn = click.option("--password-file", type=PathArg, help="File whose first line is the registry password (or AIRPACK_OCI_PASSWORD).")(fn)
    fn = click.option("--username", envvar="AIRPACK_OCI_USERNAME", help="Registry account (or AIRPACK_OCI_USERNAME).")(fn)
    fn = click.option("--plain-http", is_flag=True, help="Talk plain HTTP (a registry without TLS, e.g. on loopback).")(fn)
    return fn


# -- push ----------------------------------------------------------------------------------


@airpack_command(cli, "push")
@click.argument("bundle", type=PathArg)
@click.argument("target")
@click.option("--trust", "policy", type=PathArg, envvar="AIRPACK_TRUST", required=True, help="Trust policy to verify with first (or AIRPACK_TRUST).")
@access_options
@click.option("--chunk-size", help="Upload in PATCH chunks of this size (64MiB, or 64MB = 64,000,000 bytes; at least 1MiB) "
                                   "instead of one streamed PUT per file.")
@click.option("--workers", type=click.IntRange(min=1, max=64), help="Parallel blob uploads (default 4).")
def push_cmd(out: Output, bundle: Path, target: str, policy: Path, plain_http: bool, username: str | None,
             password_file: Path | None, ca_file: Path | None, chunk_size: str | None, workers: int | None) -> None:
    """Verify BUNDLE, then push it to TARGET (oci://HOST[:PORT]/REPOSITORY:TAG) as one OCI artifact."""
    from ..ops.oci import PushOptions, PushResult, push
    from ..trust import load_policy

    ref = parse_ref(target)
    access = access_from(plain_http, username, password_file, ca_file)
    p = load_policy(policy)
    r: PushResult = push(PushOptions(bundle=bundle, target=ref, policy=p, access=access, workers=workers, progress=out.progress,
                                     chunk_size=parse_size(chunk_size) if chunk_size else None))
    m = r.manifest
    out.result(
        r.to_json(),
        [f"pushed {m.name} (channel {m.channel}, sequence {m.sequence}) to {ref}",
         f"  verified: signed by {', '.join(k.name for k in r.signers)}",
         f"  sent {len(r.uploaded)} blob(s), {format_bytes(r.bytes_uploaded)}; {len(r.skipped)} already in the registry",
         f"  digest: {r.digest}",
         f"  nodes: airpack install {r.pinned} --registry DIR --trust POLICY"],
    )


# -- pull ----------------------------------------------------------------------------------


def _pull_text(r: PullResult) -> list[str]:
    m = r.manifest
    lines = [f"pulled {r.source} into {r.out}: {m.name} (channel {m.channel}, sequence {m.sequence}), "
             f"{len(m.files)} file(s), {format_bytes(r.bytes_received)}", f"  digest: {r.digest}"]
    if r.verified:
        lines.append(f"  verified: signed by {', '.join(k.name for k in r.signers)}; every blob matched its signed digest")
    else:
        lines.append(f"  NOT verified (no --trust): run `airpack verify {r.out} --trust POLICY` before using it")
    return lines


@airpack_command(cli, "pull")
@click.argument("source")
@click.option("--out", "out_dir", type=PathArg, required=True, help="The bundle folder to create (must not exist).")
@click.option("--trust", "policy", type=PathArg, envvar="AIRPACK_TRUST", help="Check signatures before downloading (or AIRPACK_TRUST).")
@access_options
@click.option("--workers", type=click.IntRange(min=1, max=64), help="Parallel blob downloads (default 4).")
def pull_cmd(out: Output, source: str, out_dir: Path, policy: Path | None, plain_http: bool, username: str | None,
             password_file: Path | None, ca_file: Path | None, workers: int | None) -> None:
    """Recreate a bundle folder from SOURCE (oci://HOST[:PORT]/REPOSITORY:TAG or @sha256:...)."""
    from ..ops.oci import PullOptions, pull
    from ..trust import load_policy

    ref = parse_ref(source)
    access = access_from(plain_http, username, password_file, ca_file)
    p = load_policy(policy) if policy is not None else None
    r = pull(PullOptions(source=ref, out=out_dir, policy=p, access=access, workers=workers, progress=out.progress))
    out.result(r.to_json(), lambda: _pull_text(r))
