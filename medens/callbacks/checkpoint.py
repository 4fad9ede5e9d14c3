"""ModelCheckpoint that writes `.pth` files named by the number of completed epochs."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)

_N_EPOCH = "{n_epoch}"


class MedensModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with medens' naming.

    `{n_epoch}` in `filename` is the number of completed epochs (1-based), so `resnet50_epoch_5.pth`
    holds the state after five epochs and resuming from it continues at epoch 6. Names never contain
    `=` (`auto_insert_metric_name` is off), so every path passes back as a Hydra override. The file
    format itself comes from `MedensCheckpointIO`.

    Periodic files (`monitor: step` with `{n_epoch}` in the name) keep the newest `save_top_k` by the
    epoch number in the name, counted on disk after every save. Lightning's own top-k bookkeeping lives
    in the checkpoint it is writing, so the state it restores on resume does not list the file resumed
    from (nor files of the run before it): counted by Lightning, the keep count broke after a resume.
    """

    FILE_EXTENSION = ".pth"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("auto_insert_metric_name", False)
        kwargs.setdefault("save_on_train_epoch_end", True)
        kwargs.setdefault("enable_version_counter", False)
        filename = kwargs.get("filename") or ""
        top_k = kwargs.get("save_top_k", 1)
        self.keep_newest: int | None = None
        if kwargs.get("monitor") == "step" and _N_EPOCH in filename and top_k is not None and top_k > 0:
            self.keep_newest = int(top_k)
            kwargs["save_top_k"] = -1  # keep all as far as Lightning knows; pruned by name below
        super().__init__(**kwargs)
        self._periodic_re = (
            re.compile(
                "^" + re.escape(filename.split(_N_EPOCH)[0]) + r"(\d+)" + re.escape(self.FILE_EXTENSION) + "$"
            )
            if self.keep_newest
            else None
        )

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["n_epoch"] = torch.tensor(trainer.current_epoch + 1)
        return candidates

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.keep_newest and trainer.is_global_zero and self.dirpath:
            self._prune(Path(self.dirpath))

    def _prune(self, folder: Path) -> None:
        assert self._periodic_re is not None and self.keep_newest
        found = sorted(
            ((int(m.group(1)), p) for p in folder.iterdir() if (m := self._periodic_re.match(p.name))),
            reverse=True,
        )
        for _, p in found[self.keep_newest :]:
            p.unlink(missing_ok=True)
            log.info("removed %s: only the newest %d periodic checkpoints are kept", p.name, self.keep_newest)
