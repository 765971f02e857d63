"""The ``tnsurgery`` command group: consoles, exit codes and the entry point.

Exit codes: 0 ok, 2 bad input (spec, file, option, an output path that is taken
or cannot be written, a transform that cannot build the layer asked for: a
message, never a traceback), 1 internal error. SIGTERM stops a command the way
Ctrl-C does: its temporary files are removed and its outputs are left as they were.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from tnsurgery._version import __version__
from tnsurgery.errors import UserInputError
from tnsurgery.plugins import get_plugin_manager, load_failures

# Tables are wide: when the output is not a terminal (pipes, CI logs), do not wrap at 80.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


MAX_SHOWN = 2000  # characters of one line of a message (names from files can be huge)


def shown(text: object) -> str:
    """``text`` safe to print: rich markup escaped, control characters (terminal escape
    sequences in a module name from a file) written as ``\\xNN``, each line at most
    :data:`MAX_SHOWN` characters."""
    lines = [
        line if len(line) <= MAX_SHOWN else f"{line[: MAX_SHOWN // 2]} […] {line[-200:]}"
        for line in str(text).split("\n")
    ]
    text = "\n".join(lines)
    clean = "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in str(text))
    return escape(clean)


class BadInput(click.ClickException):
    """Bad input: message only, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        err.print(f"[bold red]Error:[/] {shown(self.format_message())}", highlight=False)


class Cli(click.Group):
    """Turns tnsurgery's user errors into exit code 2, anything else into exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserInputError as exc:
            raise BadInput(str(exc)) from None
        except KeyboardInterrupt:  # Ctrl-C: not a bug; outputs were left as they were
            err.print("[yellow]Interrupted[/]", highlight=False)
            ctx.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if os.environ.get("TNSURGERY_DEBUG"):
                raise
            err.print(
                f"[bold red]Internal error:[/] {shown(f'{type(exc).__name__}: {exc}')}\n"
                "This is a bug in tnsurgery or a plugin; set TNSURGERY_DEBUG=1 for the traceback.",
                highlight=False,
            )
            ctx.exit(1)


@click.group(cls=Cli)
@click.version_option(__version__, prog_name="tnsurgery")
def cli() -> None:
    """Declarative surgery on trained PyTorch models."""


def emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON (``--json``)."""
    click.echo(json.dumps(data, indent=2, default=str))


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds: atomic writers remove their temp files


def main() -> None:
    """Entry point of the ``tnsurgery`` script."""
    signal.signal(signal.SIGTERM, _terminated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_plugin_manager()
    for f in load_failures(pm):
        line = f"plugin '{f.name}' ({f.origin}) failed to load: {f.error}"
        err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False)
    pm.hook.register_commands(cli=cli)
    cli.main(prog_name="tnsurgery")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
