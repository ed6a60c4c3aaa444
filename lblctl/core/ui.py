"""Terminal output: human text and progress go to stderr, the ``--json`` summary to stdout."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from lblctl.core.summary import Summary

console = Console(stderr=True, highlight=False)
_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = bool(quiet)


def is_quiet() -> bool:
    return _state["quiet"]


def info(message: str) -> None:
    if not _state["quiet"]:
        console.print(message)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


def progress(*extra_fields: str) -> Progress:
    """A progress bar with count, rate-bearing extra fields (e.g. ``loss``), elapsed and ETA."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *[TextColumn(f"{f} {{task.fields[{f}]}}") for f in extra_fields],
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    return Progress(*columns, console=console, disable=_state["quiet"], transient=False)


def print_summary(summary: dict[str, Any], title: str, as_json: bool) -> None:
    """One JSON object on stdout with ``--json``; otherwise a small table on stderr."""
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
        sys.stdout.flush()
        return
    if _state["quiet"]:
        return
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in _flatten(summary):
        table.add_row(key, value)
    console.print(table)


def print_run(summary: Summary, title: str, as_json: bool) -> None:
    """A stage run's Summary: its figures as JSON, or its table (else the figures), notes and warnings.
    A non-zero ``exit_code`` ends the command with it."""
    if as_json or summary.table is None:
        print_summary(summary.figures, title, as_json)
    elif not _state["quiet"]:
        console.print(summary.table)
    if not as_json and not _state["quiet"]:
        for note in summary.notes:
            info(note)
        for warning in summary.warnings:
            warn(warning)
    if summary.exit_code:
        raise SystemExit(summary.exit_code)


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and len(v) <= 12:
            rows += _flatten(v, key + ".")
        elif isinstance(v, float):
            rows.append((key, f"{v:.4g}"))
        elif isinstance(v, list) and len(v) > 5:
            rows.append((key, f"[{len(v)} items]"))
        else:
            rows.append((key, str(v)))
    return rows
