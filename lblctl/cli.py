"""The ``lblctl`` command: registers the stages and turns user errors into one line + exit 2."""

from __future__ import annotations

import importlib
import sys

import typer

from lblctl import __version__
from lblctl.core import ui
from lblctl.core.errors import LblError

# (module in lblctl.commands, command name); a stage is listed here once it works.
STAGES = [
    ("align", "align"),
    ("pretrain", "pretrain"),
    ("imprint", "imprint"),
    ("build_index", "build-index"),
    ("train_dp", "train-dp"),
    ("eval", "eval"),
    ("verify_pair", "verify-pair"),
    ("export", "export"),
    ("pack", "pack"),
]

app = typer.Typer(
    name="lblctl",
    help="Train face recognition for ID vs. spot at millions of identities with dominant-prototype "
    "softmax (DP-softmax). Stages chain through artifact folders: align → pretrain → imprint → "
    "build-index → train-dp → eval / verify-pair.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lblctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """lblctl: ID vs. spot face recognition at scale."""


for module, name in STAGES:
    mod = importlib.import_module(f"lblctl.commands.{module}")
    app.command(name=name, help=mod.__doc__, short_help=mod.SHORT_HELP, no_args_is_help=True)(mod.main)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line ``error: …`` and exit 2 for user errors; tracebacks only with --debug."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    try:
        rc = app(args=args, prog_name="lblctl", standalone_mode=False)
    except LblError as exc:
        if debug:
            raise
        ui.console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        ui.console.print("[red]error:[/red] interrupted; run the same command again (training stages: add "
                         "--resume) to continue where it stopped")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # click's usage errors (bad option, missing value, …)
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            sys.exit(0)  # typer has already shown the help
        if debug:
            raise
        where = f" ({ctx.command_path})" if ctx is not None else ""
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        ui.console.print(f"[red]error:[/red] {message}{where}; see --help", soft_wrap=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001
        if debug:
            raise
        ui.console.print(f"[red]error:[/red] unexpected {type(exc).__name__}: {exc} "
                         "(a bug in lblctl; re-run with --debug for the traceback and report it)", soft_wrap=True)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
