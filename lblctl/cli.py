"""The ``lblctl`` command: registers the stages and turns user errors into one line + exit 2."""

from __future__ import annotations

import importlib
import shlex
import sys
from typing import Any

import typer
from typer.core import TyperGroup, TyperOption
from typer.main import get_command_from_info
from typer.models import CommandInfo

from lblctl import __version__
from lblctl.core import ui
from lblctl.core.errors import LblError

# command name -> (module in lblctl.commands, short help). The module is imported only when its command
# runs or shows its own --help, so that `lblctl --help` loads neither torch nor any stage.
STAGES: dict[str, tuple[str, str]] = {
    "align": ("align", "Detect faces and crop them to the ArcFace 112×112 template, with a report of failures."),
    "pretrain": ("pretrain", "Train a backbone (small_cnn, iresnet…) with a margin softmax on labelled faces."),
    "imprint": ("imprint", "Imprint a prototype store (one unit vector per identity) from photos or features."),
    "build-index": ("build_index", "k-NN over the prototypes (faiss): candidate/dominant queues and a "
                    "duplicate-identity report."),
    "reshard": ("reshard", "Shard a prototype store for W ranks (torchrun), re-shard it, or merge it into one "
                "plain store."),
    "train-dp": ("train_dp", "DP-softmax: train over millions of identities with K prototypes on the device."),
    "eval": ("eval", "Verification (TAR@FAR, EER, 10-fold) and identification (top-1/5) figures."),
    "verify-pair": ("verify_pair", "Score a CSV of ID/spot photo pairs: cosine, same/different at a threshold "
                    "or FAR."),
    "export": ("export", "Export a backbone to ONNX (dynamic batch), checked against PyTorch within 1e-4."),
    "pack": ("pack", "Pack identity folders into an insightface .rec set (train.rec/.idx/property)."),
}

MARKUP = "markdown"
ARGV: list[str] = []  # this invocation's arguments (``--nproc`` relaunches them under torchrun)


class LazyStages(TyperGroup):
    """The stage commands, each built from its module in ``lblctl.commands`` on first use.

    While the group's own help is rendered, a command is a stand-in that carries only its short help.
    """

    _listing = False

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(STAGES)

    def get_command(self, ctx: typer.Context, cmd_name: str):  # noqa: ANN201 (a click Command)
        if cmd_name not in STAGES:
            return None
        module, short = STAGES[cmd_name]
        if self._listing:
            return typer.core.TyperCommand(name=cmd_name, short_help=short)
        if cmd_name not in self.commands:
            mod = importlib.import_module(f"lblctl.commands.{module}")
            info = CommandInfo(name=cmd_name, callback=mod.main, help=mod.__doc__, short_help=short,
                               no_args_is_help=True)
            self.commands[cmd_name] = get_command_from_info(info, pretty_exceptions_short=True,
                                                            rich_markup_mode=MARKUP)
        return self.commands[cmd_name]

    def get_help_option(self, ctx: typer.Context):  # noqa: ANN201
        opt = super().get_help_option(ctx)
        if opt is not None and opt.default is None:
            opt.default = False  # an unset None is coerced through pydantic: +0.4 s to every `lblctl STAGE …`
        return opt

    def format_help(self, ctx: typer.Context, formatter) -> None:  # noqa: ANN001
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    name="lblctl",
    cls=LazyStages,
    help="Train face recognition for ID vs. spot at millions of identities with dominant-prototype "
    "softmax (DP-softmax). Stages chain through artifact folders: align → pretrain → imprint → "
    "build-index → train-dp → eval / verify-pair.\n\n"
    "Example (the whole chain on the shipped faces, CPU, a few minutes): `bash examples/quickstart.sh`; "
    "one stage: `lblctl align --data raw --out ids --detector yunet --model examples/models/yunet.onnx`. "
    "Each stage has its own --help with an example.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=MARKUP,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _display_type(self: TyperOption, ctx: Any) -> str | None:
    """Help's type column: nothing for flags (typer shows ``<bool>``), ``<path>...`` for repeatable options
    (typer shows ``<list[Path]>``)."""
    if self.is_flag:
        return None
    shown = _typer_display_type(self, ctx)
    if shown and shown.startswith("<list[") and shown.endswith("]>"):
        shown = f"<{shown[6:-2].lower()}>..."
    return shown


_typer_display_type = TyperOption.display_type_rich
TyperOption.display_type_rich = _display_type  # type: ignore[method-assign]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lblctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """lblctl: ID vs. spot face recognition at scale."""


def interrupt_message(args: list[str]) -> str:
    """What Ctrl-C / SIGTERM left behind, and the exact command that continues from it."""
    from lblctl.train.engine import Interrupted

    saved = Interrupted.last.saved if Interrupted.last is not None else None
    if saved is None:
        return ("error: interrupted; run the same command again (training stages: add --resume) to continue "
                "where it stopped")
    again = shlex.join(["lblctl", *args, *([] if "--resume" in args else ["--resume"])])
    return f"interrupted: saved {saved}; continue with:\n  {again}"


def relaunch(nproc: int) -> None:
    """``--nproc N`` outside torchrun: run this same command under torchrun and end with its status."""
    import os

    if nproc > 1 and "RANK" not in os.environ:
        from lblctl.core.dist import launch

        raise typer.Exit(launch(nproc, ARGV))


def _rank_prefix() -> str:
    """``rank R: `` under torchrun, so that one rank's error names it (torchrun then ends the others)."""
    import os

    return f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line ``error: …`` and exit 2 for user errors; tracebacks only with --debug."""
    args = sys.argv[1:] if argv is None else list(argv)
    ARGV[:] = args
    debug = "--debug" in args
    try:
        rc = app(args=args, prog_name="lblctl", standalone_mode=False)
    except LblError as exc:
        if debug:
            raise
        ui.console.print(f"[red]error:[/red] {_rank_prefix()}{exc}", soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        ui.console.print(interrupt_message(args), soft_wrap=True, markup=False, highlight=False)
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
    if rc == 130:  # typer turns a KeyboardInterrupt into exit code 130 before the handler above sees it
        ui.console.print(interrupt_message(args), soft_wrap=True, markup=False, highlight=False)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
