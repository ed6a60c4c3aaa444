"""Options every stage shares, and the start/finish of a stage run."""

from __future__ import annotations

from typing import Annotated, Any

import torch
import typer

from lblctl.core import ui
from lblctl.core.runtime import resolve_device, seed_everything

Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N (auto = CUDA when present).",
                                     rich_help_panel="Common")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (runs are repeatable on CPU).",
                                   rich_help_panel="Common")]
Json = Annotated[bool, typer.Option("--json", help="Print the run's summary as one JSON object on stdout.",
                                    rich_help_panel="Common")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or human output.",
                                     rich_help_panel="Common")]
Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.", rich_help_panel="Common")]


def start(device: str, seed: int, quiet: bool) -> torch.device:
    """Apply the common options; returns the device to run on (errors before any work)."""
    ui.set_quiet(quiet)
    dev = resolve_device(device)
    seed_everything(seed)
    return dev


def finish(summary: dict[str, Any], title: str, as_json: bool) -> None:
    ui.print_summary(summary, title, as_json)
