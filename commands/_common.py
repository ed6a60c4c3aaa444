"""Options the commands share, declared once, and the one way a command starts, runs and prints.

Nothing heavy is imported here (no torch): ``lblctl STAGE --help`` loads this module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from lblctl.core import ui
from lblctl.core.dist import from_environ
from lblctl.core.summary import Summary

Opt = typer.Option

# the common options: every command has them, added by @stage_command
_COMMON_OPTS = [  # (parameter, type, default, flags, help)
    ("device", str, "auto", ["--device"], "auto | cpu | cuda | cuda:N (auto = CUDA when present)."),
    ("seed", int, 0, ["--seed"], "Random seed (runs are repeatable on CPU)."),
    ("json_out", bool, False, ["--json"], "Print the run's summary as one JSON object on stdout."),
    ("quiet", bool, False, ["--quiet", "-q"], "No progress bars or human output."),
    ("debug", bool, False, ["--debug"], "Show full tracebacks on errors."),
]

# options several commands share
Workers = Annotated[int, Opt(help="DataLoader worker processes (-1 = cores − 1).")]
BatchSize = Annotated[int, Opt(help="Images per forward pass.")]
Flip = Annotated[bool, Opt("--flip", help="Average each embedding with its mirror image.")]
CenterCrop = Annotated[float | None, Opt(help="Override the backbone's centre crop (ONNX models default to 1.0).")]
AnyBackbone = Annotated[Path, Opt("--backbone", help="RUN folder, backbone.pt or an ONNX model.")]
IdsData = Annotated[Path, Opt("--data", help="Identity folders DATA/IDENTITY/IMAGE or a CSV.")]
RunOut = Annotated[Path, Opt("--out", help="Run folder to write (backbone.pt, checkpoints, log).")]
Resume = Annotated[bool, Opt("--resume", help="Continue from OUT's newest checkpoint.")]
# the training loop's options (pretrain and train-dp)
Steps = Annotated[int, Opt(help="Optimisation steps (when --epochs is 0).")]
WeightDecay = Annotated[float, Opt(help="Backbone weight decay (not on the classifier).")]
Schedule = Annotated[str, Opt(help="cosine, step or constant.")]
Warmup = Annotated[int, Opt(help="Linear LR warm-up steps.")]
GradClip = Annotated[float, Opt(help="Max gradient norm (0 = off).")]
Amp = Annotated[str, Opt(help="auto (bf16/fp16 on CUDA, off on CPU), off, bf16, fp16.")]
CheckpointEvery = Annotated[int, Opt(help="Checkpoint every N steps (0 = at the end only).")]
LogEvery = Annotated[int, Opt(help="Write log.jsonl every N steps.")]
Nproc = Annotated[int, Opt("--nproc", help="Run N processes on this machine: starts torchrun (N GPUs, or N CPU "
                           "processes with gloo).")]
Tensorboard = Annotated[bool, Opt("--tensorboard", help="Also write TensorBoard events to OUT/tensorboard (needs the "
                                  "optional 'tensorboard' package: lblctl[tb]).")]


@dataclass(frozen=True)
class Common:
    """The common options as a command body sees them, the device already resolved."""
    device: Any  # torch.device
    seed: int
    json: bool
    quiet: bool


_COMMON = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, Opt(*flags, help=help, rich_help_panel="Common")])
           for name, kind, default, flags, help in _COMMON_OPTS]


def stage_command(title: str, *, device: bool = True) -> Callable[[Callable[..., Summary]], Callable[..., None]]:
    """Turn ``body(..., common: Common) -> Summary`` into a Typer command with the common options.

    It applies --quiet, resolves --device and seeds before the body runs (bad input stops before any
    work), then prints the Summary: JSON with --json, else its table. ``device=False``: a stage
    that always runs on the CPU has no --device to ignore."""
    common_opts = _COMMON if device else [p for p in _COMMON if p.name != "device"]

    def wrap(body: Callable[..., Summary]) -> Callable[..., None]:
        sig = inspect.signature(body, eval_str=True)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values() if p.name != "common"]

        def command(**kw: Any) -> None:
            dev, seed, as_json, quiet = kw.pop("device", "cpu"), kw.pop("seed"), kw.pop("json_out"), kw.pop("quiet")
            kw.pop("debug")
            common = Common(device=start(dev, seed, quiet), seed=seed, json=as_json, quiet=quiet)
            summary = body(**kw, common=common)
            if from_environ().is_main:  # under torchrun one summary per job, from rank 0
                ui.print_run(summary, title, as_json)

        command.__name__, command.__doc__, command.__module__ = body.__name__, body.__doc__, body.__module__
        command.__signature__ = sig.replace(parameters=own + common_opts, return_annotation=None)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in own + common_opts}
        return command

    return wrap


def start(device: str, seed: int, quiet: bool) -> Any:
    """Apply the common options; returns the torch.device to run on (errors before any work)."""
    from lblctl.core.runtime import resolve_device, seed_everything
    ui.set_quiet(quiet or not from_environ().is_main)  # progress and notes from rank 0 only
    dev = resolve_device(device)
    seed_everything(seed)
    return dev
