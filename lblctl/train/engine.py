"""The training engine shared by ``pretrain`` and ``train-dp``.

A small explicit loop in the spirit of arcface_torch: the caller gives modules, parameter
groups, a function that turns a batch into a loss, and a batch source per epoch; the engine
owns the device, AMP, optimiser, LR schedule, gradient clipping, checkpoints, exact resume,
the progress bar and ``log.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lblctl.core import ui
from lblctl.core.artifacts import atomic_open
from lblctl.core.dist import DistEnv
from lblctl.core.errors import IncompatibleArtifact, LblError

CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "log.jsonl"
CURVES_EVERY_S = 60.0  # curves.png is redrawn at a checkpoint at most this often while training (always at the end)


def fetch(batches: Iterable[Any], stop: DeferredInterrupt, save: Callable[[], None]) -> Iterator[Any]:
    """The batches; a fetch that fails after an interrupt (DataLoader workers took the terminal's
    Ctrl-C too) still calls ``save``, since fetching happens between steps, where the state is whole."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception:
            if stop.requested is not None:
                save()
            raise
        yield batch


class Interrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM after the work done so far was saved; ``saved`` says what, for the message.

    ``Interrupted.last`` keeps the latest one: the CLI framework turns a KeyboardInterrupt into exit
    code 130 and drops the exception before the CLI's handler could read it."""

    last: Interrupted | None = None

    def __init__(self, saved: str) -> None:
        super().__init__(saved)
        self.saved = saved
        Interrupted.last = self


class DeferredInterrupt:
    """While active, SIGINT / SIGTERM only set :attr:`requested`, so that the loop can stop at a point
    where its state is whole (between steps) and save it. A second signal stops at once, as usual.
    Only the main thread can own signal handlers; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested is not None:  # the second one: no waiting
            self._restore()
            raise KeyboardInterrupt
        self.requested = signum
        ui.warn(f"{signal.Signals(signum).name}: finishing this step and saving (press Ctrl-C again to stop now, "
                "losing the work since the last checkpoint)")

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()


@dataclass
class TrainConfig:
    """Everything that shapes the optimisation; saved in every checkpoint."""

    steps: int
    lr: float = 0.1
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | constant
    warmup_steps: int = 0
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of ``steps`` for the step schedule
    gamma: float = 0.1
    grad_clip: float = 5.0  # max global grad norm; 0 = off
    amp: str = "auto"  # auto | off | bf16 | fp16
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    curves: bool = True  # RUN/curves.png at checkpoints (at most every CURVES_EVERY_S) and at the end
    tensorboard: bool = False  # RUN/tensorboard/ event files (optional 'tensorboard' package)

    def __post_init__(self) -> None:
        if self.tensorboard:  # refused when the options are read, before any data is opened
            from lblctl.train.curves import require_tensorboard

            require_tensorboard()

    def validate(self) -> None:
        if self.steps < 1:
            raise LblError(f"--steps/--epochs give {self.steps} steps; need at least 1")
        if self.optimizer not in ("sgd", "adamw"):
            raise LblError(f"--optimizer {self.optimizer}: choose sgd or adamw")
        if self.schedule not in ("cosine", "step", "constant"):
            raise LblError(f"--schedule {self.schedule}: choose cosine, step or constant")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise LblError(f"--amp {self.amp}: choose auto, off, bf16 or fp16")
        if self.lr <= 0:
            raise LblError(f"--lr {self.lr}: must be positive")


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of the base LR at ``step``: linear warm-up, then cosine / step / constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** sum(step >= int(m * cfg.steps) for m in cfg.milestones)
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA where supported, else fp16 (with a grad scaler); on CPU only an explicit bf16
    (CPU autocast has no fp16 grad scaler, and ``auto`` keeps CPU runs in float32)."""
    if device.type != "cuda":
        return torch.bfloat16 if cfg.amp == "bf16" else None
    if cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@dataclass
class StepResult:
    loss: torch.Tensor
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Runs ``cfg.steps`` optimisation steps over the batches given per epoch."""

    def __init__(self, cfg: TrainConfig, device: torch.device, modules: dict[str, nn.Module],
                 param_groups: list[dict[str, Any]], out_dir: str | os.PathLike,
                 extra_optimizers: list[torch.optim.Optimizer] | tuple[()] = (), env: DistEnv | None = None) -> None:
        """``extra_optimizers``: optimisers a module owns (train-dp's DP head), stepped, loss-scaled,
        clipped and scheduled with the engine's own; their state lives with their module, so only
        the first optimiser is checkpointed. ``param_groups`` may be empty when they are given.
        ``env``: under torchrun every rank checkpoints its own state (its classifier shard), rank 0
        last, and only rank 0 writes the log and the curves."""
        cfg.validate()
        self.cfg, self.device, self.modules = cfg, device, modules
        self.env = env or DistEnv()
        self.out_dir = Path(out_dir)
        self.optimizers: list[torch.optim.Optimizer] = []
        for group in param_groups:
            group.setdefault("lr", cfg.lr)
            group["base_lr"] = group["lr"]
        if param_groups and cfg.optimizer == "sgd":
            self.optimizers.append(torch.optim.SGD(
                param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay))
        elif param_groups:
            self.optimizers.append(torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay))
        for opt in extra_optimizers:
            for group in opt.param_groups:
                group["base_lr"] = group["lr"]
            self.optimizers.append(opt)
        if not self.optimizers:
            raise LblError("nothing to train: no parameters were given to the optimiser")
        self.optimizer: torch.optim.Optimizer = self.optimizers[0]
        self.dtype = amp_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.aug = torch.Generator().manual_seed(cfg.seed)  # main-process augmentation randomness
        self.step = 0
        self.epoch = 0
        self.epoch_batch = 0  # batches of the current epoch already consumed
        self.extra_state: dict[str, Any] = {}
        # hooks for state that lives outside the modules (train-dp's store and queues): called
        # right before a checkpoint is written (make it durable) and right after (with its step)
        self.before_checkpoint: Callable[[], None] | None = None
        self.after_checkpoint: Callable[[int], None] | None = None
        self._tb: Any = None  # TensorBoardLog once fit() starts, with cfg.tensorboard
        self._curves_at = time.monotonic()  # when curves.png was last drawn: the first one a minute in, or at the end
        self._set_lr()

    # ------------------------------------------------------------------ pieces
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _set_lr(self) -> None:
        f = lr_factor(self.cfg, self.step)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * f

    def backward_step(self, loss: torch.Tensor) -> float:
        """Backward, unscale, clip, step, zero grads, advance the schedule; returns the grad norm."""
        self.scaler.scale(loss).backward()
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if self.env.active:
            norm = _clip_sharded(params, self.cfg.grad_clip)
        elif self.cfg.grad_clip > 0 and params:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))) \
                if params else 0.0
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.step += 1
        self._set_lr()
        return norm

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "aug": self.aug.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": "lblctl-checkpoint/1",
            "world_size": self.env.world_size,
            "step": self.step,
            "epoch": self.epoch,
            "epoch_batch": self.epoch_batch,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.cfg).items()},
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "extra": self.extra_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.epoch_batch = int(state["step"]), int(state["epoch"]), int(state["epoch_batch"])
        torch.set_rng_state(state["rng"]["torch"])
        self.aug.set_state(state["rng"]["aug"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            with contextlib.suppress(RuntimeError):
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.extra_state = state.get("extra", {})
        self._set_lr()

    def save_checkpoint(self, last: bool | None = None) -> Path:
        """Save the state at this step. ``last`` (default: the run's final step) redraws curves.png whatever
        the time since the last drawing."""
        if self.before_checkpoint is not None:
            self.before_checkpoint()
        folder = self.out_dir / CHECKPOINT_DIR
        path = folder / f"step_{self.step:08d}.pt"
        mine = rank_file(path, self.env)
        if not self.env.is_main:  # every shard is on disk before rank 0 writes the file that makes it a checkpoint
            with atomic_open(mine, "wb") as fh:
                torch.save(self.state_dict(), fh)
        _barrier(self.env)
        if self.env.is_main:
            with atomic_open(path, "wb") as fh:
                torch.save(self.state_dict(), fh)
        _barrier(self.env)
        if self.after_checkpoint is not None:
            self.after_checkpoint(self.step)
        for old in _checkpoints(folder, self.env.rank)[: -self.cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)
        if self.env.is_main:
            self._draw_curves(self.step >= self.cfg.steps if last is None else last)
        return path

    def _draw_curves(self, last: bool) -> None:
        """curves.png (and TensorBoard's buffer) brought up to date; a drawing failure never stops training.

        Drawn at most every ``CURVES_EVERY_S`` while training, and always at the end: a drawing takes
        0.3–0.6 s of the training thread here, 17–30 % of a 100-step checkpoint interval of a fast step
        (train-dp head-only, 18 ms a step)."""
        if self._tb is not None:
            self._tb.flush()
        if not self.cfg.curves or (not last and time.monotonic() - self._curves_at < CURVES_EVERY_S):
            return
        from lblctl.train.curves import write_curves

        try:
            if write_curves(self.out_dir) is not None:
                self._curves_at = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - a picture is not worth a lost run
            ui.warn(f"could not draw {self.out_dir}/curves.png: {exc}")

    def resume(self) -> int:
        """Load the newest checkpoint in ``out_dir``; return its step (0 when there is none)."""
        path = latest_checkpoint(self.out_dir)
        if path is None:
            return 0
        state = load_checkpoint(rank_file(path, self.env))
        if state.get("world_size", 1) != self.env.world_size:
            raise IncompatibleArtifact(
                f"--resume: checkpoint {path} was made by {state.get('world_size', 1)} processes, now "
                f"{self.env.world_size}; resume with the same number (the classifier is split by rank)")
        saved = state["config"]
        for key in ("steps", "lr", "optimizer", "schedule", "seed"):
            if saved.get(key) != getattr(self.cfg, key):
                raise IncompatibleArtifact(
                    f"--resume: checkpoint {path} was made with {key}={saved.get(key)!r}, now "
                    f"{getattr(self.cfg, key)!r}; resume with the same options or use a new --out"
                )
        self.load_state_dict(state)
        truncate_log(self.out_dir / LOG_FILE, self.step)
        return self.step

    # ------------------------------------------------------------------ loop
    def log(self, record: dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        path = self.out_dir / LOG_FILE
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tb.add(record)

    def _save_interrupted(self) -> None:
        """Checkpoint at the current step (between steps, so it is whole) and stop with :class:`Interrupted`."""
        path = self.save_checkpoint(last=True)
        raise Interrupted(f"checkpoint {path} (step {self.step} of {self.cfg.steps})")

    def fit(
        self,
        batches_for_epoch: Callable[[int, int], Iterable[Any]],
        compute: Callable[[Any], StepResult | None],
        *,
        steps_per_epoch: int,
        on_epoch_end: Callable[[int], dict[str, Any]] | None = None,
        on_step_end: Callable[[int], None] | None = None,
        description: str = "train",
    ) -> dict[str, Any]:
        """Train until ``cfg.steps``; ``batches_for_epoch(epoch, start_batch)`` yields batches.

        ``compute(batch)`` runs the forward pass under :meth:`autocast` and returns the loss, or
        None to skip a batch (e.g. all its images were unreadable).
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.tensorboard and self._tb is None:
            from lblctl.train.curves import TensorBoardLog

            self._tb = TensorBoardLog(self.out_dir)
        for m in self.modules.values():
            m.train()
        last: dict[str, Any] = {}
        epoch_metrics: dict[str, Any] = {}
        window_samples, window_t0, window_loss, window_n = 0, time.perf_counter(), 0.0, 0
        total_samples, t_start, start_step = 0, time.perf_counter(), self.step
        # under torchrun a signal reaches the ranks at different steps: no deferred save (the job
        # resumes from its last checkpoint, which every rank has committed)
        interrupts = DeferredInterrupt() if not self.env.active else contextlib.nullcontext(DeferredInterrupt())
        with ui.progress("loss", "samples_s") as bar, interrupts as stop:
            task = bar.add_task(description, total=self.cfg.steps, completed=self.step, loss="-", samples_s="-")
            while self.step < self.cfg.steps:
                consumed = False
                for batch in fetch(batches_for_epoch(self.epoch, self.epoch_batch), stop, self._save_interrupted):
                    consumed = True
                    self.epoch_batch += 1
                    result = compute(batch)
                    if result is None:
                        continue
                    grad_norm = self.backward_step(result.loss)
                    loss = float(result.loss.detach())
                    if not math.isfinite(loss):
                        raise LblError(f"loss became {loss} at step {self.step}; lower --lr or use --amp off")
                    window_samples += result.samples
                    total_samples += result.samples
                    window_loss += loss
                    window_n += 1
                    if on_step_end is not None:
                        on_step_end(self.step)
                    if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                        dt = max(1e-9, time.perf_counter() - window_t0)
                        last = {
                            "step": self.step, "epoch": self.epoch, "loss": window_loss / window_n,
                            "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                            "samples_per_s": window_samples / dt, **result.metrics,
                        }
                        self.log(last)
                        bar.update(task, loss=f"{last['loss']:.4f}", samples_s=f"{last['samples_per_s']:.1f}")
                        window_samples, window_t0, window_loss, window_n = 0, time.perf_counter(), 0.0, 0
                    bar.update(task, completed=self.step)
                    if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 \
                            and self.step < self.cfg.steps:
                        self.save_checkpoint()
                    if self.step >= self.cfg.steps:
                        break
                    if stop.requested is not None:
                        self._save_interrupted()
                if self.step >= self.cfg.steps and self.epoch_batch < steps_per_epoch:
                    break
                if not consumed and self.epoch_batch == 0:
                    raise LblError("no training batches: the data set is smaller than one batch")
                if on_epoch_end is not None:
                    epoch_metrics = on_epoch_end(self.epoch)
                    if epoch_metrics:
                        self.log({"step": self.step, "epoch": self.epoch, **epoch_metrics})
                    for m in self.modules.values():
                        m.train()
                self.epoch += 1
                self.epoch_batch = 0
        self.save_checkpoint(last=True)
        elapsed = time.perf_counter() - t_start
        return {
            "steps": self.step,
            "steps_this_run": self.step - start_step,
            "epochs": self.epoch,
            "final_loss": last.get("loss"),
            "samples_per_s": total_samples / elapsed if elapsed > 0 else None,
            "seconds": elapsed,
            **({"last_epoch": epoch_metrics} if epoch_metrics else {}),
        }


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (under torchrun: one that every rank committed)."""
    found = _checkpoints(Path(out_dir) / CHECKPOINT_DIR, 0)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    """The step of checkpoint ``path`` (``step_00000100.pt`` → 100), read from its name."""
    return int(path.name.split(".")[0].removeprefix("step_"))


def rank_file(path: Path, env: DistEnv) -> Path:
    """Where ``env``'s rank keeps its part of checkpoint ``path`` (rank 0: ``path`` itself)."""
    return path if env.rank == 0 else path.with_name(f"{path.stem}.rank{env.rank}{path.suffix}")


def _checkpoints(folder: Path, rank: int) -> list[Path]:
    if rank == 0:
        return sorted(p for p in folder.glob("step_*.pt") if ".rank" not in p.name)
    return sorted(folder.glob(f"step_*.rank{rank}.pt"))


def _clip_sharded(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip by the global gradient norm when some parameters are split over the ranks (``sharded``):
    their squared norms are summed over ranks, the replicated ones (DDP-averaged) counted once, so
    every rank scales by the same factor, the one a single process would use."""
    import torch.distributed as dist

    device = params[0].grad.device if params else torch.device("cpu")
    sq = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(2)]
    for p in params:
        sq[int(getattr(p, "sharded", False))] += p.grad.detach().double().pow(2).sum()
    dist.all_reduce(sq[1])
    norm = float((sq[0] + sq[1]).sqrt())  # one sync a step, as the single-process clip has
    if max_norm > 0 and norm > max_norm:
        for p in params:
            p.grad.detach().mul_(max_norm / (norm + 1e-6))
    return norm


def _barrier(env: DistEnv) -> None:
    if env.active:
        import torch.distributed as dist

        dist.barrier()


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the same user problem
        raise IncompatibleArtifact(f"checkpoint {path}: unreadable ({str(exc).splitlines()[0][:120]}); "
                                   "delete it to resume from the one before") from None
    if not isinstance(state, dict) or state.get("format") != "lblctl-checkpoint/1":
        raise IncompatibleArtifact(f"checkpoint {path}: not an lblctl checkpoint")
    return state


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after ``step`` (a resumed run rewrites them)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    with atomic_open(path, "w") as fh:
        fh.write("".join(x + "\n" for x in keep))
