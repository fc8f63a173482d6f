"""The ``airpack`` command line: a thin layer over ``airpack.ops``.

Commands live in modules by topic; each registers itself on ``cli`` when
imported. ``cli`` is lazy: ``COMMANDS`` names each top-level command's module
and short help, so ``airpack --help`` lists every command without importing
any of them, and ``airpack verify`` imports the one module that defines it
(and that module imports the operations it runs inside the command). A test
checks that the short help here matches each command's own.

Ctrl-C must never print a traceback, even in the first tenth of a second,
while click and this module are still being imported (before ``main`` runs
and can catch anything): until this module's imports are done, SIGINT ends
the process at once with exit 130 and one line, as nothing has been written
yet; then the default handler is back and ``main`` catches the interrupt.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_starting(signum: int, frame: object) -> None:
    os.write(2, b"interrupted\n")
    os._exit(130)


try:  # only the main thread may set handlers; an embedding program that set its own keeps it
    _STARTING = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if _STARTING:
        signal.signal(signal.SIGINT, _interrupted_while_starting)
except ValueError:
    _STARTING = False

import importlib  # noqa: E402 - after the start-up SIGINT handler, on purpose
from typing import Any, NamedTuple  # noqa: E402

import click  # noqa: E402

from .. import __version__  # noqa: E402
from ..errors import BrokenPipe, Interrupted  # noqa: E402


class CommandEntry(NamedTuple):
    module: str  # under airpack.cli
    help: str  # the first paragraph of the command's docstring


COMMANDS: dict[str, CommandEntry] = {
    "keygen": CommandEntry(
        "core_cmds", "Create a signing key pair: NAME.key (private, 0600) and NAME.pub; with --pkcs11, inside a token (only NAME.pub is written).",
    ),
    "trust": CommandEntry("core_cmds", "Manage this host's trust policy (who may sign bundles)."),
    "key": CommandEntry("core_cmds", "Keys on hardware tokens (PKCS#11): export the public key of a key a token holds."),
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
    "check": CommandEntry(
        "check_cmds", "Re-hash every installed file and check refs, links, kept envelopes and the audit log against the database.",
    ),
    "fit": CommandEntry(
        "fit_cmds",
        "Estimate whether MODEL (a model folder, a bundle folder, tar or parts folder, an installed repo"
        " id, or a Hub repo ORG/NAME[@REVISION], read without its weights) fits. Exit 5 if not.",
    ),
    "export": CommandEntry("transfer_cmds", "Write a verified BUNDLE folder as one deterministic tar, or as parts for media with a signed index."),
    "repair": CommandEntry("transfer_cmds", "Rebuild missing or damaged parts of a split export from its parity parts."),
    "diff": CommandEntry("transfer_cmds", "Show what changed between bundles OLD and NEW: models, files, wheels, signers, licences, policy, fit."),
    "sbom": CommandEntry("transfer_cmds", "Write BUNDLE's CycloneDX 1.6 SBOM (JSON): the model, each file and wheel with its SHA-256."),
    "profile": CommandEntry(
        "profile_cmds",
        "Write this host's profile (GPUs, Python tags, installed files, blobs, wheels, channels, trusted key ids) for pack --for.",
    ),
    "report": CommandEntry("report_cmds", "Write an audit report of BUNDLE (or of --registry DIR) that a reviewer can read, print and sign off."),
}
COMMAND_MODULES = tuple(dict.fromkeys(e.module for e in COMMANDS.values()))


def _import_module(module: str) -> None:
    importlib.import_module(f"{__name__}.{module}")


class LazyGroup(click.Group):
    """A group whose commands are imported when they are run (or their own help is shown).

    Help and usage text printed into a closed pipe (``airpack --help | head -1``) raise
    ``BrokenPipe``, which ``main`` ends with exit 141 like any command's output; left as an
    OSError, click itself would turn it into exit 1. Ctrl-C while click parses or a command
    module imports is ``Interrupted`` (exit 130, one line), not click's "Aborted!".
    """

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except BrokenPipeError:
            raise BrokenPipe("stdout was closed") from None
        except KeyboardInterrupt:  # left to click, it would print an empty line and "Aborted!"
            raise Interrupted("interrupted") from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # a subcommand's --help or usage text
            raise BrokenPipe("stdout was closed") from None
        except KeyboardInterrupt:  # while a command module is still being imported
            raise Interrupted("interrupted") from None

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
    """The console script: run one command; every way out goes through ``_common.fail``.

    From here on Ctrl-C is a ``KeyboardInterrupt`` again, which every command turns into exit
    130 with one line (after its own clean-up); a reader that closes stdout early
    (``airpack list | head -1``) ends the command with exit 141 and nothing more printed.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            cli.main(args=args, prog_name="airpack", standalone_mode=False)
            sys.stdout.flush()  # --help or --version into a closed pipe fails here, not at interpreter exit
        except SystemExit:
            raise
        except BaseException as e:  # noqa: BLE001 - the one place any exception becomes an exit code
            from ._common import fail  # only on the way out: `airpack --help` loads no command machinery

            verbose = any(a == "--verbose" or (len(a) > 1 and a[0] == "-" and set(a[1:]) == {"v"}) for a in args)
            fail(e, as_json="--json" in args, verbose=int(verbose))
    except KeyboardInterrupt:  # a second Ctrl-C while the first one was being reported
        os.write(2, b"interrupted\n")
        os._exit(130)
    sys.exit(0)


# The imports are done: from here Ctrl-C is a KeyboardInterrupt again, which ``main`` (or a
# program that imported this module) handles.
if _STARTING and signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
    signal.signal(signal.SIGINT, signal.default_int_handler)
