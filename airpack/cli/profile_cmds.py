"""profile: the offline host writes what it holds (for ``pack --for``), or a security officer reads one."""

from __future__ import annotations

from pathlib import Path

import click

from . import cli
from ._common import Output, airpack_command
from .install_cmds import PathArg


@airpack_command(cli, "profile")
@click.option("--registry", type=PathArg, envvar="AIRPACK_REGISTRY", help="The registry folder (or AIRPACK_REGISTRY).")
@click.option("--out", "out_path", type=PathArg, help="Write the profile here (deterministic JSON).")
@click.option("--name", "label", help="A label for this host in the profile (nothing names the host otherwise).")
@click.option("--gpu", help="The host's GPUs as NAME[:COUNT] or SIZE[:COUNT], instead of asking NVML.")
@click.option("--trust", "policy", type=PathArg, envvar="AIRPACK_TRUST",
              help="Record this trust policy's key ids, names and threshold (or AIRPACK_TRUST).")
@click.option("--show", "show", type=PathArg, metavar="PROFILE.json", help="Print a short summary of a profile; write nothing.")
def profile_cmd(out: Output, registry: Path | None, out_path: Path | None, label: str | None, gpu: str | None,
                policy: Path | None, show: Path | None) -> None:
    """Write this host's profile (GPUs, Python tags, installed files, blobs, wheels, channels, trusted key ids) for pack --for.

    The profile holds no host name (unless --name gives a label), no user
    names, no absolute paths and no file contents; docs/profile.md lists every
    field. --show PROFILE.json prints what a profile says (exit 2 if it is not
    one). The registry is only read.
    """
    from ..errors import UsageError
    from ..host_profile import load_profile

    if show is not None:
        p = load_profile(show)
        out.result(p.to_json(), p.summary)
        return
    if registry is None or out_path is None:
        raise UsageError("profile needs --registry DIR and --out PROFILE.json (or --show PROFILE.json)")
    from ..ops.profile import ProfileOptions, write_profile
    from ..trust import load_policy

    pol = load_policy(policy) if policy is not None else None
    p = write_profile(ProfileOptions(registry=registry, out=out_path, name=label, gpu=gpu, policy=pol))
    out.result({"profile": str(out_path), **p.to_json()}, lambda: [f"wrote {out_path}", *p.summary()])
