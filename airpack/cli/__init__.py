"""The ``airpack`` command line: a thin layer over ``airpack.ops``.

Commands live in modules by topic; each registers itself on ``cli``.
"""

from __future__ import annotations

import json
import sys

import click

from .. import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="airpack")
def cli() -> None:
    """Carry open models across air gaps: pack, sign, verify, install, fit."""


# Each module registers its commands on ``cli`` when imported.
COMMAND_MODULES = ("core_cmds", "oci_cmds", "install_cmds", "fit_cmds", "transfer_cmds")


def _load_commands() -> None:
    import importlib

    for mod in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{mod}")


def main(argv: list[str] | None = None) -> None:
    _load_commands()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=args, prog_name="airpack", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        if "--json" in args:
            click.echo(json.dumps({"error": {"exit_code": 2, "type": "UsageError", "message": e.format_message(), "path": None}}))
        else:
            e.show()
        sys.exit(2)
    sys.exit(0)
