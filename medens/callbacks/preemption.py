"""Preemption: on SIGTERM (and SIGUSR1 where configured) finish the current step, write a resumable
`<name>_last.pth`, and exit with a "preempted" status.

Where the run stops, so that resuming with `ckpt_path=<name>_last.pth` ends with exactly the weights of
an uninterrupted run:

- mid-epoch: at the end of the training batch that is running when the signal arrives, saved at the
  point where Lightning's step-based checkpoints are saved (`on_train_batch_end`), which its loops know
  how to restart from; medens' loaders (`medens.data.resumable`) then skip the batches already done;
- during the epoch's last batch or its validation: after the epoch's end (validation, best and periodic
  checkpoints, history), at the same point as a periodic checkpoint.

The file is the medens format (written by `MedensCheckpointIO`, atomically), so plain
`torch.load(p, weights_only=True)` reads it. The process then raises `Preempted`, a `SystemExit` with
status 128 + the signal number (143 for SIGTERM, 138 for SIGUSR1), as a shell reports a process ended
by that signal; the log says "preempted". Under DDP all ranks stop at the same batch. Under SLURM with
Lightning's auto-requeue, SIGUSR1 stays Lightning's (it saves `hpc_ckpt_N.ckpt`, in the medens format
too, and requeues); the SIGTERM that follows writes `<name>_last.pth`.
"""

from __future__ import annotations

import gc
import logging
import signal
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """The run was stopped by a signal after writing its resume checkpoint; `code` is 128 + signum."""

    def __init__(self, signum: int, path: str | None) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.path = path


def _signal(name: str | int) -> signal.Signals:
    if isinstance(name, int):
        return signal.Signals(name)
    key = str(name).upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    try:
        return signal.Signals[key]
    except KeyError:
        from medens.errors import ConfigError

        raise ConfigError(
            f"callbacks.preemption.signals: unknown signal {name!r} (e.g. SIGTERM, SIGUSR1)"
        ) from None


class Preemption(Checkpoint):
    """Turn a termination signal into a resumable `<filename>.pth` and a "preempted" exit (see module).

    A `Checkpoint` subclass, so Lightning runs its epoch-end hook after the ModelCheckpoints.
    """

    FILE_EXTENSION = ".pth"

    def __init__(self, dirpath: str, filename: str, signals: list[str | int] | tuple = ("SIGTERM",)) -> None:
        self.dirpath = str(dirpath)
        self.filename = str(filename)
        self.signals = [_signal(s) for s in signals]
        self.received: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, Any] = {}

    @property
    def path(self) -> str:
        return str(Path(self.dirpath) / f"{self.filename}{self.FILE_EXTENSION}")

    @property
    def state_key(self) -> str:
        return "Preemption"

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received, self.received_at = signum, time.monotonic()
            log.warning(
                "received %s: finishing the current step, then writing %s",
                signal.Signals(signum).name,
                self.path,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning.fabric.plugins.environments import SLURMEnvironment

        if trainer.received_sigterm:  # Lightning's own handler caught one before training started
            trainer._signal_connector.received_sigterm = False
            self._handler(signal.SIGTERM, None)
        env = trainer._accelerator_connector.cluster_environment
        slurm_requeue = isinstance(env, SLURMEnvironment) and env.auto_requeue
        for sig in self.signals:
            if slurm_requeue and sig == (env.requeue_signal or signal.SIGUSR1):
                log.info("%s stays Lightning's SLURM requeue signal", sig.name)
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: signals cannot be handled here
                log.warning("cannot handle %s outside the main thread; preemption is not caught", sig.name)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, prev in self._previous.items():
            try:
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
            except ValueError:
                pass
        self._previous = {}

    def _requested(self, trainer: pl.Trainer) -> bool:
        local = self.received is not None
        if trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(local, all=False))
        return local

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if not self._requested(trainer):
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's last batch: stop after its validation and epoch-end checkpoints
        self._stop(trainer, "mid-epoch")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        max_epochs = trainer.max_epochs
        more = max_epochs is None or max_epochs < 0 or trainer.current_epoch + 1 < max_epochs
        if self._requested(trainer) and more and not trainer.should_stop:
            self._stop(trainer, "at the end of the epoch")

    def _stop(self, trainer: pl.Trainer, where: str) -> None:
        signum = self.received if self.received is not None else signal.SIGTERM
        path = trainer.strategy.broadcast(self.path)
        trainer.save_checkpoint(path)
        self._restore()
        latency = f" {time.monotonic() - self.received_at:.2f}s after the signal" if self.received_at else ""
        log.warning(
            "preempted by %s %s (epoch %d, step %d): wrote %s%s; resume with ckpt_path=%s; exiting with status %d",
            signal.Signals(signum).name, where, trainer.current_epoch + 1, trainer.global_step, path, latency,
            path, 128 + signum,
        )  # fmt: skip
        gc.freeze()  # the process ends now: spare it a final collection over every object of the run
        raise Preempted(signum, path)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass
