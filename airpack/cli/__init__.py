"""The ``airpack`` command line: a thin layer over ``airpack.ops``.

Commands live in modules by topic; each registers itself on ``cli`` when
imported. ``cli`` is lazy: ``COMMANDS`` names each top-level command's module
and short help, so ``airpack --help`` lists every command without importing
any of them, and ``airpack verify`` imports the one module that defines it
(and that module imports the operations it runs inside the command). A test
checks that the short help here matches each command's own.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple

import click

from .. import __version__


class CommandEntry(NamedTuple):
    module: str  # under airpack.cli
    help: str  # the first paragraph of the command's docstring


COMMANDS: dict[str, CommandEntry] = {
    "keygen": CommandEntry("core_cmds", "Create a signing key pair: NAME.key (private, 0600) and NAME.pub."),
    "trust": CommandEntry("core_cmds", "Manage this host's trust policy (who may sign bundles)."),
    "pack": CommandEntry("core_cmds", "Pack the models (and wheels) a SPEC names into a signed bundle."),
    "sign": CommandEntry("core_cmds", "Add a signature to BUNDLE (co-signing) after checking every file against its manifest."),
    "verify": CommandEntry("core_cmds", "Check BUNDLE (a folder, a tar, or a folder of parts) against the trust policy, every path, size and byte."),
    "inspect": CommandEntry("core_cmds", "Show BUNDLE's manifest WITHOUT verifying it (nothing here is trusted)."),
    "push": CommandEntry("oci_cmds", "Verify BUNDLE, then push it to TARGET (oci://HOST[:PORT]/REPOSITORY:TAG) as one OCI artifact."),
    "pull": CommandEntry("oci_cmds", "Recreate a bundle folder from SOURCE (oci://HOST[:PORT]/REPOSITORY:TAG or @sha256:...)."),
    "install": CommandEntry(
        "install_cmds", "Verify BUNDLE (a folder, a tar, a parts folder or oci://...) and install it into the registry, all or nothing.",
    ),
    "list": CommandEntry("install_cmds", "List the installed models: revision, commit, bundle, channel, sequence, signers."),
    "show": CommandEntry("install_cmds", "Show an installed model and the exact lines that load it offline."),
    "remove": CommandEntry("install_cmds", "Remove an installed model (repo id) or bundle (bundle name); files still used elsewhere stay."),
    "rollback": CommandEntry("install_cmds", "Point NAME back at the revision installed before the current one."),
    "log": CommandEntry("install_cmds", "The registry's audit log."),
    "fit": CommandEntry(
        "fit_cmds",
        "Estimate whether MODEL (a model folder, a bundle folder, tar or parts folder, or an installed repo id) fits. Exit 5 if not.",
    ),
    "export": CommandEntry("transfer_cmds", "Write a verified BUNDLE folder as one deterministic tar, or as parts for media with a signed index."),
    "repair": CommandEntry("transfer_cmds", "Rebuild missing or damaged parts of a split export from its parity parts."),
    "diff": CommandEntry("transfer_cmds", "Show what changed between bundles OLD and NEW: models, files, wheels, signers, licences, policy, fit."),
    "sbom": CommandEntry("transfer_cmds", "Write BUNDLE's CycloneDX 1.6 SBOM (JSON): the model, each file and wheel with its SHA-256."),
}
COMMAND_MODULES = tuple(dict.fromkeys(e.module for e in COMMANDS.values()))


def _import_module(module: str) -> None:
    importlib.import_module(f"{__name__}.{module}")


class LazyGroup(click.Group):
    """A group whose commands are imported when they are run (or their own help is shown)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            _import_module(COMMANDS[cmd_name].module)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from ``COMMANDS``: the same rows click would print, with nothing imported."""
        rows: list[tuple[str, click.Command]] = []
        for name in self.list_commands(ctx):
            # A command not imported yet: a stand-in that shortens its help exactly as the real one would.
            cmd = self.commands[name] if name in self.commands else click.Command(name, help=COMMANDS[name].help)
            if not cmd.hidden:
                rows.append((name, cmd))
        if rows:
            limit = formatter.width - 6 - max(len(name) for name, _ in rows)
            with formatter.section("Commands"):
                formatter.write_dl([(name, cmd.get_short_help_str(limit)) for name, cmd in rows])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="airpack")
def cli() -> None:
    """Carry open models across air gaps: pack, sign, verify, install, fit."""


def _load_commands() -> None:
    """Import every command module (tests and tools that walk the whole command tree)."""
    for module in COMMAND_MODULES:
        _import_module(module)


def main(argv: list[str] | None = None) -> None:
    """The console script: run one command; every way out goes through ``_common.fail``."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=args, prog_name="airpack", standalone_mode=False)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the one place any exception becomes an exit code
        from ._common import fail  # only on the way out: `airpack --help` loads no command machinery

        verbose = any(a == "--verbose" or (len(a) > 1 and a[0] == "-" and set(a[1:]) == {"v"}) for a in args)
        fail(e, as_json="--json" in args, verbose=int(verbose))
    sys.exit(0)
